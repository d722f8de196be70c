"""The wheel installs datamodules/ (with pipeline/) and callbacks/ under dti_sprites (no generic
top-level names)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_maps_datamodules_and_callbacks_under_dti_sprites(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("dti_sprites-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dti_sprites"}
    for folder in ("datamodules", "datamodules/pipeline", "callbacks"):
        expected = {f"dti_sprites/{folder}/{p.name}" for p in (ROOT / folder).glob("*.py")}
        assert expected <= set(names)
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    for script in ("dti-sprites =", "lightning =", "dti-sprites-data ="):
        assert script in entry_points


def test_editable_install_imports_the_mapped_packages_from_anywhere(tmp_path):
    code = (
        "import dti_sprites.datamodules as d, dti_sprites.callbacks as c; "
        "print(d.TetrominoesDataModule.__module__, c.SpriteFreeze.__module__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "dti_sprites.datamodules.multi_object",
        "dti_sprites.callbacks.freeze",
    ]


def test_the_tests_import_the_installed_package_not_a_tests_folder():
    # pytest puts tests/ on sys.path (pythonpath), so a folder tests/dti_sprites would shadow the
    # editable install as a namespace package and every `dti_sprites.<sub>` import would fail.
    import dti_sprites

    assert not (ROOT / "tests" / "dti_sprites").exists()
    assert dti_sprites.__file__ is not None  # a namespace package has no __init__ file
    assert hasattr(dti_sprites, "DTISprites")
