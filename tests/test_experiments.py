"""Every config in experiments/ (ablations included) trains one step and validates on tiny data."""

import warnings
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from dti_sprites.cli import main

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CONFIGS = sorted(EXPERIMENTS.rglob("*.yaml"))


def test_every_paper_experiment_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"tetrominoes", "multidsprites", "clevr6", "demo", "gtsrb8", "svhn", "horse",
            "instagram"} <= names  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_trains_one_step(config, experiment_data, tmp_path, monkeypatch):
    cwd, root = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land here: the root holds the run
    spec = yaml.safe_load(config.read_text())
    data_class = spec["data"]["class_path"].rsplit(".", 1)[1]
    location = "path" if "path" in spec["data"]["init_args"] else "root"
    main([
        "fit", "--config", str(config),
        f"--data.init_args.{location}={experiment_data[data_class]}",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        "--trainer.max_steps=1", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=1",
        "--trainer.logger=false", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert not list(cwd.iterdir())
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert checkpoints == [root / "checkpoints" / "last.ckpt"]
    # Loadable without unpickling arbitrary classes (typed CLI values are saved as builtins).
    checkpoint = torch.load(checkpoints[0], weights_only=True)
    assert checkpoint["global_step"] == 1
    assert checkpoint["dti_sprites_model"]["n_sprites"] == spec["model"]["model"]["init_args"][
        "n_sprites"]  # fmt: skip
    assert (root / "images" / "sprites.png").exists()


def test_demo_fit_test_predict_through_the_cli(experiment_data, tmp_path, monkeypatch, capsys):
    """The three subcommands a user runs after training, on the demo config; test and predict
    find the trained model with --ckpt_path=last in the run's root."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    common = [
        "--config", str(EXPERIMENTS / "demo.yaml"),
        f"--data.init_args.path={experiment_data['TetrominoesDataModule']}",
        "--data.init_args.batch_size=4", "--trainer.logger=false",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps=2"])
    assert (root / "checkpoints" / "last.ckpt").exists()
    with warnings.catch_warnings():  # Lightning only warns when "last" finds no checkpoint
        warnings.filterwarnings("error", message=".*no last checkpoint")
        main(["test", *common, "--ckpt_path=last"])
        printed = capsys.readouterr().out
        assert "Test results (%)" in printed and "paper320" in printed and "heldout" in printed
        main(["predict", *common, "--ckpt_path=last"])
    with h5py.File(root / "predictions.h5") as f:
        n = len(f["index"])
        assert n == 10  # the paper320 split of the 12-record file (2 are held out)
        assert f["reconstruction"].shape == (n, 35, 35, 3)
        assert f["layers"].shape == (n, 3, 35, 35, 4) and f["sprite_choice"].shape == (n, 3)
        assert f["semantic"][()].max() <= 19 and f["instance"][()].max() <= 3
