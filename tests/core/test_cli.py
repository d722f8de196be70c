import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import h5py
import pytest
import torch
import wandb
import yaml

from dti_sprites.cli import main

DEMO = str(Path(__file__).parents[2] / "experiments" / "demo.yaml")


def script(name: str) -> str:
    """The console script ``name`` of the running interpreter's environment (not found on PATH,
    so the tests pass without an activated venv)."""
    folder = sysconfig.get_path("scripts")
    path = shutil.which(name, path=folder)
    if path is None:
        pytest.fail(
            f"console script {name!r} not found in {folder}: install the package into "
            f"the environment of {sys.executable} (pip install -e .)"
        )
    return path


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


def test_console_scripts_show_help_and_print_config():
    help_ = run(script("dti-sprites"), "--help")
    assert help_.returncode == 0 and "{fit,validate,test,predict}" in help_.stdout
    module = run(sys.executable, "-m", "dti_sprites", "fit", "--help")
    assert module.returncode == 0 and "--model.lr" in module.stdout
    config = run(script("lightning"), "fit", "--config", DEMO, "--print_config")
    assert config.returncode == 0, config.stderr
    assert "n_sprites: 19" in config.stdout and "TetrominoesDataModule" in config.stdout


def test_lightning_forwards_other_subcommands_or_says_why_not():
    result = run(script("lightning"), "login")
    try:
        import lightning_sdk  # noqa: F401
    except ImportError:
        assert result.returncode != 0
        assert "lightning-sdk" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    else:
        assert "is not one of dti-sprites' subcommands" not in result.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--model.model.init_args.n_sprites=0", "n_sprites"),
        ("--model.model.init_args.empty_penalty=-1", "empty_penalty"),
        ("--model.model.init_args.layer_transforms=[color,warp]", "layer_transforms"),
        ("--model.model.init_args.n_sprits=5", "n_sprits"),
        ("--trainer.max_epocs=3", "max_epocs"),
    ],
)
def test_bad_values_and_misspelt_keys_fail_at_parse_time_naming_the_key(override, key, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEMO, override, "--print_config"])
    assert exit_.value.code != 0
    assert key in capsys.readouterr().err


def test_the_headline_command_without_its_data_file_says_so_in_one_line(tmp_path):
    """`dti-sprites fit --config experiments/multidsprites.yaml` where the file is missing:
    the hint, no traceback, exit status 2, and nothing written (no W&B run, no root)."""
    config = Path(DEMO).parent / "multidsprites.yaml"
    root = tmp_path / "run"
    result = subprocess.run(
        [
            script("dti-sprites"),
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={root}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dti-sprites: error: data/multi_dsprites_colored_on_grayscale.h5 not")
    assert "dti-sprites-data download --dataset multi_dsprites" in last
    assert not root.exists() and not (tmp_path / "wandb").exists()
    assert not list(tmp_path.iterdir())  # nothing written anywhere
    output = result.stdout + result.stderr
    assert "GPU available" not in output and "W&B" not in output  # checked before the trainer


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _without_mask(source: Path, path: Path) -> Path:
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        del f["mask"]
    return path


@pytest.mark.parametrize(
    ("damage", "expected"),
    [(_truncated, "not a readable HDF5 file"), (_without_mask, "'mask'")],
)
def test_a_broken_data_file_ends_the_run_in_one_line_naming_it(
    damage, expected, experiment_data, tmp_path, capsys, monkeypatch
):
    """The demo's config (W&B logger, checkpoints) on a truncated file or one without a key:
    one line, exit status 2, and nothing written: no root, no W&B run, no folder anywhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = damage(experiment_data["TetrominoesDataModule"], tmp_path / "broken.h5")
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                DEMO,
                f"--data.init_args.path={path}",
                f"--trainer.default_root_dir={root}",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dti-sprites: error: {path}") and expected in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert list(tmp_path.iterdir()) == [path]  # no root, no wandb/, nothing else
    assert wandb.run is None


def test_sprite_canvas_larger_than_the_image_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="sprite_size"):
        main(
            [
                "fit",
                "--config",
                DEMO,
                "--model.model.init_args.sprite_size=40",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false",
            ]
        )


def test_two_roots_share_nothing_and_last_resumes_its_own_root(
    experiment_data, tmp_path, monkeypatch
):
    """--trainer.default_root_dir alone places everything a run writes (checkpoints, W&B files,
    pictures, config.yaml), and --ckpt_path=last resumes from that root's last.ckpt."""
    cwd, home = tmp_path / "cwd", tmp_path / "wandb_home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the configs' paths were relative to the working directory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))

    def fit(root, steps, *extra):
        # FinalTrainingLoss records the global step and how many steps this process trained.
        record = {
            "class_path": "dti_sprites.sweep.FinalTrainingLoss",
            "init_args": {"path": str(root / "record.json"), "window": 100},
        }
        try:
            main(
                [
                    "fit",
                    "--config",
                    DEMO,
                    f"--data.init_args.path={experiment_data['TetrominoesDataModule']}",
                    "--data.init_args.batch_size=2",
                    f"--trainer.default_root_dir={root}",
                    f"--trainer.max_steps={steps}",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false",
                    f"--trainer.callbacks+={json.dumps(record)}",
                    *extra,
                ]
            )
        finally:
            wandb.finish()  # one W&B run per fit, as in separate processes
        return json.loads((root / "record.json").read_text())

    a, b = tmp_path / "a", tmp_path / "b"
    assert (fit(a, 2)["steps"], fit(b, 3)["steps"]) == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cwd", "wandb_home"]
    assert not list(cwd.iterdir())  # nothing in the working directory
    for root in (a, b):
        assert (root / "checkpoints" / "last.ckpt").is_file()
        assert len(list((root / "wandb").glob("offline-run-*"))) == 1
        (images,) = root.glob("dti-sprites/*/images")  # the W&B run's folder
        assert (images / "decompositions.png").is_file() and (images / "sprites.png").is_file()
        saved = yaml.safe_load((root / "config.yaml").read_text())["trainer"]
        assert saved["default_root_dir"] == str(root)
        assert saved["logger"]["init_args"]["save_dir"] == str(root)
        assert saved["logger"]["init_args"]["name"] == root.name  # the W&B run's name
        (checkpoint,) = [c for c in saved["callbacks"] if c["class_path"].endswith("Checkpoint")]
        assert checkpoint["init_args"]["dirpath"] == str(root / "checkpoints")

    b_last = (b / "checkpoints" / "last.ckpt").read_bytes()
    # Resumed from a's step 2 (b's last.ckpt is at step 3, a fresh start would train 3 steps).
    resumed = fit(a, 3, "--ckpt_path=last")
    assert (resumed["steps"], resumed["window"]) == (3, 1)
    assert torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (b / "checkpoints" / "last.ckpt").read_bytes() == b_last
