"""Every config in experiments/ trains one step and validates on tiny data; every ablation (a
delta in experiments/ablations/) does so composed with its base, by the command in its header."""

import re
import warnings
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from dti_sprites.cli import main

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
BASES = sorted(EXPERIMENTS.glob("*.yaml"))
ABLATIONS = sorted((EXPERIMENTS / "ablations").glob("*.yaml"))
# name: (base config, the one key set under model.model.init_args, its value)
ABLATION_DELTAS = {
    "no_mask_noise": ("tetrominoes", "mask_noise", 0.0),
    "lambda_0": ("multidsprites", "empty_penalty", 0.0),
    "lambda_1e-5": ("multidsprites", "empty_penalty", 1e-5),
    "lambda_1e-4": ("multidsprites", "empty_penalty", 1e-4),
    "lambda_1e-3": ("multidsprites", "empty_penalty", 1e-3),
}


def composed(ablation: Path) -> list[Path]:
    """The ``--config`` files of the ``dti-sprites fit`` command in an ablation's header."""
    (command,) = [
        line
        for line in ablation.read_text().splitlines()
        if line.startswith("#   dti-sprites fit ")
    ]
    return [EXPERIMENTS.parent / path for path in re.findall(r"--config (\S+)", command)]


RUNS = [[config] for config in BASES] + [composed(ablation) for ablation in ABLATIONS]


def test_every_paper_experiment_has_a_config():
    names = {p.stem for p in BASES}
    assert {
        "tetrominoes",
        "multidsprites",
        "clevr6",
        "demo",
        "gtsrb8",
        "svhn",
        "horse",
        "instagram",
    } <= names


def test_every_ablation_is_a_few_line_delta_on_its_base():
    assert {p.stem for p in ABLATIONS} == set(ABLATION_DELTAS)
    for ablation in ABLATIONS:
        base, key, value = ABLATION_DELTAS[ablation.stem]
        text = ablation.read_text()
        assert text.startswith("# Ablation (docs/method.md §10)")
        assert composed(ablation) == [EXPERIMENTS / f"{base}.yaml", ablation]
        base_model = yaml.safe_load((EXPERIMENTS / f"{base}.yaml").read_text())["model"]["model"]
        assert key in base_model["init_args"]
        # The one setting, and the run's root, which also names the W&B run: nothing else.
        assert yaml.safe_load(text) == {
            "model": {"model": {"init_args": {key: value}}},
            "trainer": {"default_root_dir": f"runs/ablations/{base}_{ablation.stem}"},
        }


@pytest.mark.parametrize(
    "configs", RUNS, ids=lambda c: "+".join(str(p.relative_to(EXPERIMENTS)) for p in c)
)
def test_config_trains_one_step(configs, experiment_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' roots are relative: runs/…
    specs = [yaml.safe_load(config.read_text()) for config in configs]
    data_class = specs[0]["data"]["class_path"].rsplit(".", 1)[1]
    location = "path" if "path" in specs[0]["data"]["init_args"] else "root"
    model = {k: v for spec in specs for k, v in spec["model"]["model"]["init_args"].items()}
    root = tmp_path / specs[-1]["trainer"]["default_root_dir"]
    main(
        [
            "fit",
            *(arg for config in configs for arg in ("--config", str(config))),
            f"--data.init_args.{location}={experiment_data[data_class]}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=1",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--trainer.check_val_every_n_epoch=null",
            "--trainer.val_check_interval=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert checkpoints == [root / "checkpoints" / "last.ckpt"]  # in the root the configs set
    # Loadable without unpickling arbitrary classes (typed CLI values are saved as builtins).
    checkpoint = torch.load(checkpoints[0], weights_only=True)
    assert checkpoint["global_step"] == 1
    for key in ("n_sprites", "empty_penalty", "mask_noise"):  # an ablation's value wins
        if key in model:
            assert checkpoint["dti_sprites_model"][key] == model[key], key
    assert (root / "images" / "sprites.png").exists()


def test_demo_fit_test_predict_through_the_cli(experiment_data, tmp_path, monkeypatch, capsys):
    """The three subcommands a user runs after training, on the demo config; test and predict
    find the trained model with --ckpt_path=last in the run's root."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    common = [
        "--config",
        str(EXPERIMENTS / "demo.yaml"),
        f"--data.init_args.path={experiment_data['TetrominoesDataModule']}",
        "--data.init_args.batch_size=4",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]
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
        # ARI-FG's labels: every pixel given to a layer (1..L).
        assert f["instance_fg"].shape == (n, 35, 35)
        assert 1 <= f["instance_fg"][()].min() and f["instance_fg"][()].max() <= 3


SEEDED = sorted(
    p for p in BASES if "SpriteSeeding" in p.read_text()
)  # the fast recipes and the demo
SHORT_SCHEDULES = {  # every stage within 6 steps: sprites on and seeded at 3, refitted at 5
    "Curriculum": {"sprite": [3]},  # the configs that list it count in steps
    "SpriteSeeding": {"at_step": 3, "collect_steps": 2, "refit_every": 2, "refit_until": 5},
    "SpriteFreeze": {"steps": 3},
    "LayerReset": {"every_n_steps": 2},
    "SpriteReassignment": {"every_n_steps": 2},
    "SpriteDashboard": {"every_n_steps": 1000},
}


@pytest.mark.parametrize("config", SEEDED, ids=lambda p: p.stem)
def test_seeded_config_runs_its_whole_schedule(config, experiment_data, tmp_path, monkeypatch):
    """The one-step test above ends before a fast recipe's schedule acts: here the schedule is
    compressed into 6 steps, so the sprite transformations switch on, the masks are seeded and
    then refitted through the full warp (CLEVR6's projective one included)."""
    from resume_helpers import small_config

    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load(config.read_text())
    data_class = spec["data"]["class_path"].rsplit(".", 1)[1]
    root = tmp_path / "run"
    main(
        [
            "fit",
            *(
                a
                for c in small_config(config.stem, tmp_path / "short.yaml", SHORT_SCHEDULES)
                for a in ("--config", str(c))
            ),
            f"--data.init_args.path={experiment_data[data_class]}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=6",
            "--trainer.max_epochs=-1",
            "--trainer.max_time=null",
            "--trainer.limit_val_batches=1",
            "--trainer.check_val_every_n_epoch=null",
            "--trainer.val_check_interval=6",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    (seeding,) = [v for k, v in checkpoint["callbacks"].items() if "SpriteSeeding" in k]
    kinds = {event["step"]: event["kind"] for event in seeding["events"]}
    assert kinds[3] == "seed" and kinds[5] == "refit"
    state = checkpoint["state_dict"]
    sprite_heads = [k for k in state if k.startswith("model.sprite_transforms.n_active")]
    assert all(
        int(state[k]) == len(spec["model"]["model"]["init_args"].get("sprite_transforms", []))
        for k in sprite_heads
    )  # every sprite transformation on
