"""dti_sprites.cli.build: one way to build an experiment, resolved as `dti-sprites fit` resolves
it (issue 21)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from dti_sprites.callbacks import Preemption, SpriteReassignment
from dti_sprites.cli import DTISpritesCLI, build, config_arg, main
from dti_sprites.datamodules import MultiDSpritesDataModule
from dti_sprites.io import DataSourceError

ROOT = Path(__file__).parents[2]
EXPERIMENTS = ROOT / "experiments"
SCREENS = ROOT / "benchmarks" / "convergence" / "demo_screens"
CONFIGS = sorted(EXPERIMENTS.glob("*.yaml")) + sorted((EXPERIMENTS / "ablations").glob("*.yaml"))


def base_of(config: Path) -> list[Path]:
    """An ablation with its base (the first --config of the command in its header)."""
    if config.parent.name != "ablations":
        return [config]
    (line,) = [x for x in config.read_text().splitlines() if x.startswith("#   dti-sprites fit")]
    return [ROOT / line.split("--config ")[1].split()[0], config]


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested dict; lists are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flat(item, f"{prefix}.{key}" if prefix else key))
    return out


def data_overrides(configs: list[Path], experiment_data: dict[str, Path]) -> list[str]:
    spec = yaml.safe_load(configs[0].read_text())["data"]
    location = "path" if "path" in spec["init_args"] else "root"
    path = experiment_data[spec["class_path"].rsplit(".", 1)[1]]
    return [f"--data.init_args.{location}={path}", "--data.init_args.num_workers=0"]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)).removesuffix(".yaml")
)
def test_build_resolves_every_experiment_as_the_fit_command(
    config, experiment_data, tmp_path, monkeypatch
):
    """Same resolved config (outputs placed under the root, seed, links), same model
    hyper-parameters, same DataModule and the same callbacks as `dti-sprites fit --config …`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    configs = base_of(config)
    overrides = data_overrides(configs, experiment_data)
    command: dict[str, DTISpritesCLI] = {}

    def keep(cli: LightningCLI, subcommand: str) -> None:
        command["cli"] = cli  # built and checked, not run

    monkeypatch.setattr(LightningCLI, "_run_subcommand", keep)
    main(["fit", *(a for c in configs for a in ("--config", str(c))), *overrides])
    cli = command["cli"]
    experiment = build(configs, overrides)

    fit, built = vars(cli.config.fit), vars(experiment.config)
    # The fit subcommand's own arguments (Trainer.fit's) are not part of the experiment.
    assert fit.keys() - built.keys() == {"ckpt_path", "weights_only"}
    assert built == {key: fit[key] for key in built}
    assert experiment.model.hparams == cli.model.hparams
    assert type(experiment.datamodule) is type(cli.datamodule)
    assert vars(experiment.datamodule).keys() == vars(cli.datamodule).keys()
    assert [type(c) for c in experiment.trainer.callbacks] == [
        type(c) for c in cli.trainer.callbacks
    ]
    assert [type(c) for c in experiment.callbacks] == [type(c) for c in cli.config_callbacks]
    assert not any(isinstance(c, Preemption) for c in experiment.callbacks)  # the config's own
    assert experiment.trainer.max_steps == cli.trainer.max_steps
    assert experiment.trainer.default_root_dir == cli.trainer.default_root_dir


def test_names_paths_and_dicts_are_the_same_config(tmp_path):
    demo = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())
    assert config_arg("demo") == str(EXPERIMENTS / "demo.yaml")
    assert config_arg(tmp_path / "x") == str(tmp_path / "x")
    by_name = build("demo", trainer=False).config
    by_dict = build(demo, trainer=False).config
    del by_name["config"], by_dict["config"]  # the --config values themselves
    assert by_name == by_dict


def test_a_delta_changes_only_its_keys():
    """A screen on the demo: the keys it sets, nothing else; the overrides come last."""
    base = build("demo", trainer=False).config.as_dict()
    screen = build(
        ["demo", SCREENS / "c1.yaml"], ["--trainer.max_time=null"], trainer=False
    ).config.as_dict()
    del base["config"], screen["config"]
    changed = {
        key
        for key in flat(base).keys() | flat(screen).keys()
        if flat(base).get(key) != flat(screen).get(key)
    }
    assert changed == {
        "model.model.init_args.mask_std",
        "trainer.max_steps",
        "trainer.max_time",
        "trainer.callbacks",
    }
    assert (screen["model"]["model"]["init_args"]["mask_std"], screen["trainer"]["max_time"]) == (
        5,
        None,
    )


@pytest.mark.parametrize("screen", sorted(SCREENS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_screen_is_a_delta_on_the_demo(screen):
    """No screen repeats the demo's data, model or trainer settings it does not change."""
    delta = yaml.safe_load(screen.read_text())
    assert "data" not in delta and "seed_everything" not in delta
    assert set(delta.get("model", {})) <= {"model", "lr_drops"}  # what a screen changes
    assert "python benchmarks/convergence.py --config experiments/demo.yaml" in screen.read_text()
    callbacks = build(["demo", screen], trainer=False).callbacks
    assert any(isinstance(c, SpriteReassignment) for c in callbacks)


def test_without_a_trainer_nothing_checks_or_needs_the_data(tmp_path):
    missing = tmp_path / "missing.h5"
    experiment = build("multidsprites", [f"--data.init_args.path={missing}"], trainer=False)
    assert experiment.trainer is None and isinstance(experiment.datamodule, MultiDSpritesDataModule)
    assert experiment.model.model.n_layers == 5 and experiment.datamodule.path == missing
    with pytest.raises(ValueError, match="trainer=False"):
        experiment.fit()
    with pytest.raises(DataSourceError, match="not found"):
        build("multidsprites", [f"--data.init_args.path={missing}"])
    assert not list(tmp_path.iterdir())


def test_a_bad_override_exits_naming_the_key(capsys):
    with pytest.raises(SystemExit):
        build("demo", ["--model.model.init_args.n_sprits=5"], trainer=False)
    assert "n_sprits" in capsys.readouterr().err


@pytest.mark.parametrize("malloc", [[], ["--malloc-defaults"]])
def test_train_step_benchmark_runs_from_a_config(malloc):
    """benchmarks/train_step.py builds its model with build (tiny sizes); its line says when
    freed memory went back to the kernel (glibc's defaults) rather than kept, as in training."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_step.py"),
            "--config",
            "tetrominoes",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            *malloc,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config=tetrominoes precision=32" in result.stdout
    assert ("keep_freed_memory=0" in result.stdout) == bool(malloc)
