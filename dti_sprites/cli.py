"""Command line: ``dti-sprites {fit,validate,test,predict} --config experiments/X.yaml``.

One LightningCLI serves ``dti-sprites``, ``python -m dti_sprites`` and the ``lightning``
console script (for those four subcommands; anything else goes to lightning-sdk's CLI).

Everything a run writes goes under one root, ``--trainer.default_root_dir`` (see
:func:`place_run_outputs`).
"""

from __future__ import annotations

import importlib
import inspect
import netrc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

import dti_sprites.callbacks  # registers the callback classes for short names
import dti_sprites.datamodules  # noqa: F401
from dti_sprites.callbacks import PredictionWriter, Preemption
from dti_sprites.datamodules.base import DTIDataModule
from dti_sprites.io import DataSourceError
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


def _configured(value: object) -> Iterator[tuple[type, Namespace]]:
    """(class, init_args) of each ``class_path`` entry of a parsed logger or callbacks value."""
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, Namespace) and isinstance(entry.get("init_args"), Namespace):
            module, _, name = entry.class_path.rpartition(".")
            yield getattr(importlib.import_module(module), name), entry.init_args


def place_run_outputs(config: Namespace) -> None:
    """Put everything the run writes under its root, ``trainer.default_root_dir``, in place.

    ``config`` is a parsed ``fit``/``validate``/``test``/``predict`` config. The root defaults to
    the working directory, as in Lightning. Values the config sets explicitly are kept; otherwise:

    - a logger whose ``save_dir`` is left at its default (WandbLogger's ``.``) saves in the root
      (W&B: ``<root>/wandb/``), and a W&B run without a ``name`` is named after the root's last
      folder (``runs/tetrominoes`` → ``tetrominoes``);
    - a ``ModelCheckpoint`` without ``dirpath`` writes ``<root>/checkpoints/``: one fixed folder
      per root, so ``--ckpt_path=last`` finds this root's ``last.ckpt`` (Lightning's default
      folder holds the logger's version, new in every run);
    - the dashboard's pictures and tables, ``predictions.h5`` and ``config.yaml`` follow the
      logger into the root (:func:`~dti_sprites.callbacks.run_dir`).
    """
    trainer = config.trainer
    root = Path(trainer.default_root_dir or ".")
    for cls, init_args in _configured(trainer.logger):
        save_dir = inspect.signature(cls).parameters.get("save_dir")
        if save_dir is not None and init_args.get("save_dir") == save_dir.default:
            init_args.save_dir = str(root)
        if issubclass(cls, WandbLogger) and init_args.get("name") is None and root.name:
            init_args.name = root.name
    for cls, init_args in _configured(trainer.callbacks):
        if issubclass(cls, ModelCheckpoint) and init_args.get("dirpath") is None:
            init_args.dirpath = str(root / "checkpoints")


class DTISpritesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always present; writes <run dir>/predictions.h5 during `predict` only.
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        # Always present: SIGUSR1 / SIGTERM (a cluster stopping the job) -> a checkpoint at the
        # end of the step under way, exit status 0; `--preemption.signals=[]` turns it off.
        parser.add_lightning_class_args(Preemption, "preemption")

    def _check_data(self) -> None:
        """The data file / folder exists and is valid: one line (main) if not, before the
        trainer or the logger start anything."""
        if isinstance(self.datamodule, DTIDataModule):
            self.datamodule.check_source(self.subcommand)  # the subcommand names the stage

    before_fit = before_validate = before_test = before_predict = _check_data

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        place_run_outputs(config)
        if "WandbLogger" in str(config.get("trainer", {}).get("logger")):
            wandb_offline_fallback()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dti-sprites`` (``args`` for in-process use, e.g. tests).

    Missing or invalid data (:class:`~dti_sprites.io.DataSourceError`) ends the command with
    its one-line message on stderr and exit status 2, without a traceback.
    """
    try:
        DTISpritesCLI(
            DTISpritesModule,
            DTIDataModule,
            subclass_mode_model=False,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except DataSourceError as err:
        print(f"dti-sprites: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


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
