"""Command line: ``dti-sprites {fit,validate,test,predict} --config experiments/X.yaml``, and
:func:`build`, the same resolution of configs in Python.

One LightningCLI serves ``dti-sprites``, ``python -m dti_sprites`` and the ``lightning``
console script (for those four subcommands; anything else goes to lightning-sdk's CLI).
:func:`build` gives the model, DataModule, trainer and callbacks of ``dti-sprites fit`` for
scripts and tests (benchmarks, ``dti-sprites-sweep``, the test helpers): the same parser, linked
arguments, run-output placement and data check.

Everything a run writes goes under one root, ``--trainer.default_root_dir`` (see
:func:`place_run_outputs`).
"""

from __future__ import annotations

import importlib
import inspect
import netrc
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
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
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"  # in a checkout


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
    """The project's LightningCLI: always-present prediction writer and preemption handler,
    run outputs placed under one root, W&B offline without a login, and the data checked before
    the trainer or the logger start anything.

    Args (besides LightningCLI's):
        build_trainer: instantiate the trainer (``False``: model, data and callbacks only;
            :func:`build` with ``trainer=False``).
        check_stage: without a subcommand (``run=False``), the stage whose data to check before
            the trainer is built (``None``: no check). A subcommand checks its own stage.
    """

    def __init__(
        self, *args: Any, build_trainer: bool = True, check_stage: str | None = None, **kwargs: Any
    ) -> None:
        self.build_trainer = build_trainer
        self.check_stage = check_stage
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Always present; writes <run dir>/predictions.h5 during `predict` only.
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        # Always present: SIGUSR1 / SIGTERM (a cluster stopping the job) -> a checkpoint at the
        # end of the step under way, exit status 0; `--preemption.signals=[]` turns it off.
        parser.add_lightning_class_args(Preemption, "preemption")

    def before_instantiate_classes(self) -> None:
        place_run_outputs(self._resolved())

    def _resolved(self) -> Namespace:
        """The parsed config of this command (``fit``'s, …; the whole config without one)."""
        return self.config.get(self.subcommand) if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs: Any) -> Trainer | None:
        """Check the data (one line from :func:`main` if missing or invalid), then build the
        trainer: nothing is written, printed or started before the check. (The model, the
        DataModule, the callbacks and the logger objects exist by now; a logger starts its run
        when first used, in ``fit``.)"""
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        self.config_callbacks: list[Callback] = (
            list(callbacks) if isinstance(callbacks, list) else [callbacks]
        )  # before the trainer adds its own
        stage = self.subcommand or self.check_stage
        if stage is not None and isinstance(self.datamodule, DTIDataModule):
            self.datamodule.check_source(stage)  # the subcommand names the stage
        if not self.build_trainer:
            return None
        if "WandbLogger" in str(self._resolved().get("trainer", {}).get("logger")):
            wandb_offline_fallback()
        return super().instantiate_trainer(**kwargs)


def make_cli(args: list[str] | None = None, *, run: bool = True, **kwargs: Any) -> DTISpritesCLI:
    """The one construction of :class:`DTISpritesCLI`: ``run=True`` for the command line (a
    subcommand first in ``args``), ``run=False`` for :func:`build`."""
    return DTISpritesCLI(
        DTISpritesModule,
        DTIDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        **kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dti-sprites`` (``args`` for in-process use, e.g. tests).

    Missing or invalid data (:class:`~dti_sprites.io.DataSourceError`) ends the command with
    its one-line message on stderr and exit status 2, without a traceback, before the trainer
    or the logger start anything.
    """
    try:
        make_cli(args)
    except DataSourceError as err:
        print(f"dti-sprites: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------- build
ConfigSource = str | Path | dict[str, Any]


def config_arg(source: ConfigSource) -> str:
    """A ``--config`` value: a dict as YAML text, a bare name (``"demo"``) as
    ``experiments/<name>.yaml``, anything else as a path."""
    if isinstance(source, dict):
        return yaml.safe_dump(source, sort_keys=False)
    text = str(source)
    if isinstance(source, str) and "/" not in text and not text.endswith((".yaml", ".yml")):
        return str(EXPERIMENTS / f"{text}.yaml")
    return text


@dataclass
class Experiment:
    """A ``dti-sprites fit`` experiment built from configs (:func:`build`), not yet run."""

    model: DTISpritesModule
    datamodule: DTIDataModule
    trainer: Trainer | None  # None with build(trainer=False)
    config: Namespace  # the resolved fit config (as `dti-sprites fit` resolves it)
    callbacks: list[Callback] = field(default_factory=list)  # the config's trainer.callbacks
    cli: DTISpritesCLI | None = field(default=None, repr=False)

    def fit(self, ckpt_path: str | Path | None = None) -> None:
        """``trainer.fit`` of the model on the data (what ``dti-sprites fit`` runs)."""
        if self.trainer is None:
            raise ValueError("built with trainer=False: no trainer to fit with")
        self.trainer.fit(self.model, self.datamodule, ckpt_path=ckpt_path)


def build(
    config: ConfigSource | Sequence[ConfigSource],
    overrides: Sequence[str] = (),
    *,
    trainer: bool = True,
    check_data: bool | None = None,
) -> Experiment:
    """Model, DataModule, trainer and callbacks of ``dti-sprites fit --config C1 --config C2 …
    OVERRIDES``, resolved as that command resolves them (:class:`DTISpritesCLI` with
    ``run=False``: linked arguments, ``seed_everything``, run outputs under
    ``trainer.default_root_dir``, W&B offline without a login).

    Args:
        config: one config or several, applied in order (a base, then deltas such as
            ``experiments/ablations/*.yaml``): a YAML path, a bare experiment name (``"demo"``:
            ``experiments/demo.yaml``) or a dict of the same shape as the YAML.
        overrides: command-line overrides, ``--key=value``, applied after the configs.
        trainer: build the trainer (with the config's callbacks, logger and the CLI's own
            callbacks). ``False``: model, data and callbacks only, no logger run.
        check_data: check the DataModule's data (``check_source("fit")``) and raise
            :class:`~dti_sprites.io.DataSourceError` if it is missing or invalid. Default: when
            the trainer is built.

    Parse errors exit (``SystemExit``) naming the key, as on the command line.
    """
    sources = [config] if isinstance(config, str | Path | dict) else list(config)
    args = [arg for source in sources for arg in ("--config", config_arg(source))]
    check = trainer if check_data is None else check_data
    with warnings.catch_warnings():  # a script's own sys.argv is not meant for the CLI
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = make_cli(
            [*args, *overrides],
            run=False,
            build_trainer=trainer,
            check_stage="fit" if check else None,
        )
    return Experiment(
        model=cli.model,
        datamodule=cli.datamodule,
        trainer=cli.trainer,
        config=cli.config,
        callbacks=cli.config_callbacks,
        cli=cli,
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
