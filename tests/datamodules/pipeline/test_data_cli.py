"""``dti-sprites-data``: subcommands in-process, one-line errors, lazy download import."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import h5py
import pytest

from dti_sprites.datamodules.pipeline.cli import main


def test_synth_then_convert(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "md.tfrecords", tmp_path / "md.h5"
    argv = ["synth", "--dataset", "multi_dsprites", "--variant", "binarized", "--n", "6"]
    assert main([*argv, "--seed", "3", "--out", str(src)]) == 0
    assert src.exists()
    argv = ["convert", "--dataset", "multi_dsprites", "--variant", "binarized"]
    assert main([*argv, "--src", str(src), "--out", str(out), "--limit", "4"]) == 0
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (4, 64, 64, 3)
        assert f.attrs["variant"] == "binarized"
    err = capsys.readouterr().err
    assert "read 4 records, kept 4, filtered 0, wrote 4" in err


def test_bad_input_is_one_line_on_stderr(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "t.tfrecords", tmp_path / "t.h5"
    assert main(["synth", "--dataset", "tetrominoes", "--n", "3", "--out", str(src)]) == 0
    src.write_bytes(src.read_bytes()[:-30])
    capsys.readouterr()
    status = main(["convert", "--dataset", "tetrominoes", "--src", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("dti-sprites-data convert: error: ")
    assert str(src) in err[-1] and "record 2" in err[-1]
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--dataset", "multi_dsprites", "--variant", "grey"],
        ["convert", "--dataset", "tetrominoes"],
    ],
)
def test_usage_errors_exit_non_zero(tmp_path: Path, capsys, argv: list[str]) -> None:
    paths = ["--src", str(tmp_path / "absent.tfrecords"), "--out", str(tmp_path / "x.h5")]
    assert main([*argv, *paths]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err


def test_argparse_rejects_unknown_dataset(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", "--dataset", "mnist", "--src", "a", "--out", "b"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_download_is_imported_lazily_and_called(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []

    def download(dataset, root, variant=None, base_url="default", convert_after=True):
        calls.append((dataset, Path(root), variant, base_url, convert_after))
        return Path(root) / "clevr6.h5"

    fake = types.ModuleType("dti_sprites.datamodules.pipeline.download")
    fake.download = download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dti_sprites.datamodules.pipeline.download", fake)
    assert main(["download", "--dataset", "clevr6", "--root", str(tmp_path)]) == 0
    argv = ["download", "--dataset", "multi_dsprites", "--variant", "binarized"]
    assert main([*argv, "--root", str(tmp_path), "--base-url", "http://127.0.0.1:1/x"]) == 0
    assert calls == [
        ("clevr6", tmp_path, None, "default", True),
        ("multi_dsprites", tmp_path, "binarized", "http://127.0.0.1:1/x", True),
    ]
    assert str(tmp_path / "clevr6.h5") in capsys.readouterr().out


def test_download_errors_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def download(dataset, root, variant=None, base_url="default", convert_after=True):
        raise OSError(f"cannot reach {base_url}")

    fake = types.ModuleType("dti_sprites.datamodules.pipeline.download")
    fake.download = download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dti_sprites.datamodules.pipeline.download", fake)
    argv = ["download", "--dataset", "tetrominoes", "--root", str(tmp_path), "--base-url", "u"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == "dti-sprites-data download: error: cannot reach u"
