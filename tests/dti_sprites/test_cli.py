import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dti_sprites.cli import main

DEMO = str(Path(__file__).parents[2] / "experiments" / "demo.yaml")


def script(name: str) -> str:
    """The console script ``name`` of the running interpreter's environment (not found on PATH,
    so the tests pass without an activated venv)."""
    folder = sysconfig.get_path("scripts")
    path = shutil.which(name, path=folder)
    if path is None:
        pytest.fail(f"console script {name!r} not found in {folder}: install the package into "
                    f"the environment of {sys.executable} (pip install -e .)")  # fmt: skip
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


def test_sprite_canvas_larger_than_the_image_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="sprite_size"):
        main(["fit", "--config", DEMO, "--model.model.init_args.sprite_size=40",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])  # fmt: skip
