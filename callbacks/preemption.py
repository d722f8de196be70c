"""Stopping in the middle of an epoch, resumably: at the cluster's signal (a checkpoint at the
end of the step under way, then exit 0), and at ``max_steps`` / ``max_time``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

SignalName = Literal["SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGCONT"]


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written: the process exits with status 0."""

    def __init__(self) -> None:
        super().__init__(0)


class Preemption(L.Callback):
    """Saves a checkpoint and exits with status 0 when the process gets one of ``signals``.

    SLURM sends ``SIGTERM`` before it stops a job (time limit, preemption, ``scancel``) and, with
    ``#SBATCH --signal=SIGUSR1@90``, ``SIGUSR1`` 90 s before the time limit. The handler only
    notes the signal; the training step under way finishes, and at its end (after every other
    callback's ``on_train_batch_end``: at ``setup`` this callback moves itself to the end of
    ``trainer.callbacks``, after the checkpoint callbacks) every process agrees
    to stop (the signal may reach the processes at different steps), the checkpoint is written
    where ``--ckpt_path=last`` finds it (``last.ckpt`` of the run's ``ModelCheckpoint``), and the
    processes exit with status 0. A resumed run continues exactly from that step.

    When Lightning's cluster environment is SLURM with ``auto_requeue`` (the default under
    ``srun``) and the signal is its ``requeue_signal`` (SIGUSR1 unless set), rank 0 also runs
    ``scontrol requeue <job id>``, as Lightning's own handler does; this callback replaces
    that handler, which would save in the middle of a step. The requeued job runs the same
    script: give it ``--ckpt_path=last``.

    Handlers are installed when training starts and the previous ones put back when it ends.
    The signals are acted on between training steps only: one arriving during the final
    validation lets the run finish normally.

    A run that ends in the middle of an epoch without a signal (``max_steps``, ``max_time``)
    leaves in ``last.ckpt`` the state at the end of its last step too. (Lightning closes the
    cut epoch as if it were complete, and the checkpoints written then resume at the next
    epoch: a run continued from them would skip the rest of the epoch.)

    Args:
        signals: the signals that stop the run (``[]``: none, this callback does nothing).
        requeue: run ``scontrol requeue`` on SLURM's requeue signal when the run's
            SLURMEnvironment has ``auto_requeue``.
    """

    def __init__(
        self,
        signals: list[SignalName] | None = None,
        requeue: bool = True,
    ) -> None:
        names = ["SIGUSR1", "SIGTERM"] if signals is None else list(signals)
        self.signals = [signal.Signals[name] for name in names]
        self.requeue = bool(requeue)
        self.received: int | None = None  # the signal noted, None before one arrives
        self._previous: dict[signal.Signals, Any] = {}
        self._stopped: tuple[int, Path, Path] | None = None  # (step, saved, last.ckpt path)

    # ------------------------------------------------------------------------------ handlers
    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # only a note: the work is done between steps

    def _install(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: not the main thread, no signal handlers installed")
            return
        signals = list(self.signals)
        environment = _slurm(trainer)
        if signals and environment is not None and environment.auto_requeue:
            requeue_signal = environment.requeue_signal or signal.SIGUSR1
            if requeue_signal not in signals:
                signals.append(signal.Signals(requeue_signal))
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._note)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Last: the checkpoint holds what every other callback did at the step it stops after.
        # (Lightning orders the callbacks before setup, and not again.)
        # A new list: the one Lightning is iterating to call this hook stays as it is.
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its own handlers (Trainer._run), so these replace them.
        self.received = None
        self._stopped = None
        self._install(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        # After the checkpoints of the cut epoch's end (on_train_epoch_end, validation,
        # ModelCheckpoint.on_train_end): last.ckpt becomes the state at the last step's end.
        if self._stopped is not None and trainer.is_global_zero:
            step, saved, last = self._stopped
            if step == trainer.global_step and saved.is_file():
                os.replace(saved, last)
                os.utime(last)  # the newest "last" file: the one --ckpt_path=last takes
        self._stopped = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # ---------------------------------------------------------------------------- stopping
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signals:
            self._stop_on_signal(trainer)
        if self._stops_mid_epoch(trainer, batch_idx):
            last = self.checkpoint_path(trainer)
            saved = last.with_name(".stopped-mid-epoch.ckpt")
            trainer.save_checkpoint(saved)
            self._stopped = (trainer.global_step, saved, last)

    @staticmethod
    def _stops_mid_epoch(trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether training stops after this step, which is not the last of its epoch."""
        max_steps = trainer.max_steps
        at_max_steps = max_steps is not None and 0 <= max_steps <= trainer.global_step
        epoch_goes_on = batch_idx + 1 < trainer.num_training_batches
        return (trainer.should_stop or at_max_steps) and epoch_goes_on

    def _stop_on_signal(self, trainer: L.Trainer) -> None:
        noted = self.received is not None
        if not trainer.strategy.reduce_boolean_decision(noted, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(self.received).name if noted else "a signal to another process"
        rank_zero_info(
            f"Preemption: got {name}; checkpoint of global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}) written to {path}; resume with --ckpt_path=last"
        )
        if noted and self.requeue and trainer.is_global_zero:
            environment = _slurm(trainer)
            requeue_signal = environment.requeue_signal if environment else None
            if environment is not None and environment.auto_requeue:
                if self.received == (requeue_signal or signal.SIGUSR1):
                    requeue_slurm_job()
        raise Preempted()

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """The last checkpoint of the first ``ModelCheckpoint`` (``last.ckpt`` in its folder,
        where ``--ckpt_path=last`` looks), else ``<default_root_dir>/checkpoints/last.ckpt``."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                if callback.save_last and callback.last_model_path:
                    return Path(callback.last_model_path)
                name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
                return Path(callback.dirpath) / name
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def _slurm(trainer: L.Trainer) -> SLURMEnvironment | None:
    """The run's SLURM cluster environment, if it has one."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:
        connector = getattr(trainer, "_accelerator_connector", None)
        environment = getattr(connector, "cluster_environment", None)
    return environment if isinstance(environment, SLURMEnvironment) else None


def requeue_slurm_job() -> int:
    """``scontrol requeue`` this SLURM job (array task); returns scontrol's exit status."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job = os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    try:
        status = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        status = 127
    if status == 0:
        rank_zero_info(f"Preemption: requeued SLURM job {job}")
    else:
        rank_zero_warn(f"Preemption: `scontrol requeue {job}` failed (status {status})")
    return status
