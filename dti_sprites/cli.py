"""Command line: ``dti-sprites {fit,validate,test,predict} --config experiments/X.yaml``.

One LightningCLI serves ``dti-sprites``, ``python -m dti_sprites`` and the ``lightning``
console script (for those four subcommands; anything else goes to lightning-sdk's CLI).
"""

from __future__ import annotations

import netrc
import os
import sys
from urllib.parse import urlparse

from lightning.pytorch.cli import LightningCLI

import dti_sprites.callbacks  # registers the callback classes for short names
import dti_sprites.datamodules  # noqa: F401
from dti_sprites.callbacks import PredictionWriter
from dti_sprites.datamodules.base import DTIDataModule
from dti_sprites.module import DTISpritesModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def wandb_logged_in() -> bool:
    """Whether W&B credentials exist locally (API key variable or ~/.netrc), without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline_fallback() -> None:
    """Without a W&B login, run W&B offline instead of prompting or failing (one line)."""
    if not os.environ.get("WANDB_MODE") and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        print("W&B: no login found, logging offline (sync later with `wandb sync`).")


class DTISpritesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always present; writes <run dir>/predictions.h5 during `predict` only.
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if "WandbLogger" in str(config.get("trainer", {}).get("logger")):
            wandb_offline_fallback()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dti-sprites`` (``args`` for in-process use, e.g. tests)."""
    DTISpritesCLI(
        DTISpritesModule,
        DTIDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def lightning_main() -> None:
    """The ``lightning`` console script: our four subcommands, else lightning-sdk's CLI."""
    argv = sys.argv[1:]
    if not argv or argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help"):
        main(argv)
        return
    try:
        from lightning_sdk.cli.entrypoint import main_cli
    except ImportError:
        sys.exit(
            f"lightning: {argv[0]!r} is not one of dti-sprites' subcommands {SUBCOMMANDS}, and "
            "lightning-sdk (which provides the rest of the `lightning` command) is not installed"
        )
    sys.exit(main_cli())
