"""When validation refines: the model's refinement at evaluation only at the fit's end."""

from __future__ import annotations

from contextlib import ExitStack

import lightning as L
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from dti_sprites.callbacks.eval_report import EvalReport


class ValidationRefinement(L.Callback):
    """The validations inside a fit score the network's own selection, unrefined, until step
    ``from_step`` (default: the fit's ``max_steps``, so only the final validation is refined).

    The model's refinement at evaluation (``DTISprites(pose_refinement, order_search, …)``,
    docs/method.md §11) makes a validation about 20 times slower on a CPU: minutes per
    validation for Multi-dSprites. With this callback the validations of a fit that only
    draw the learning curve skip it:

    - refined: those from ``from_step`` on, and the one that Lightning runs when a stop is
      requested during a training step (``trainer.should_stop``, e.g. by ``max_time``: the
      fit's last);
    - unrefined: the earlier ones and every sanity check. An ``EarlyStopping`` on validation
      scores stops after an unrefined validation, with no further one.

    Outside a fit (``validate``, ``test``, ``predict``) the model refines as configured. The
    model's settings are put back after each validation, and on an exception or at teardown,
    so checkpoints, weights and everything after the validation see the model's own. The
    choice is a function of the step, so a resumed run validates as an uninterrupted one.
    List it after :class:`~dti_sprites.callbacks.EvalReport` (it warns otherwise), whose
    worst images are decomposed again at the end of the validation: then they are drawn as
    they were scored.

    Args:
        from_step: the first step (optimizer steps done) whose validation is refined; None:
            the trainer's ``max_steps`` (which must then be set).
    """

    def __init__(self, from_step: NonNegativeInt | None = None) -> None:
        self.from_step = None if from_step is None else int(from_step)
        self.unrefined = ExitStack()  # holds the model's unrefined() during a validation

    def first_refined_step(self, trainer: L.Trainer) -> int:
        """``from_step``, or the trainer's ``max_steps`` when it is None."""
        if self.from_step is not None:
            return self.from_step
        if trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError(
                "ValidationRefinement(from_step=None) refines the validation at max_steps, "
                "but trainer.max_steps is not set: set it or give from_step"
            )
        return trainer.max_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self.first_refined_step(trainer)  # a missing max_steps fails now, not at the end
        after = trainer.callbacks[trainer.callbacks.index(self) + 1 :]
        if any(isinstance(callback, EvalReport) for callback in after):
            rank_zero_warn(
                "ValidationRefinement is listed before EvalReport: the worst images of an "
                "unrefined validation are drawn refined (list it after EvalReport)"
            )

    def _refines(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != TrainerFn.FITTING:
            return True  # a standalone validate: as the model is configured
        if trainer.sanity_checking:
            return False
        return trainer.global_step >= self.first_refined_step(trainer) or trainer.should_stop

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._refines(trainer):
            self.unrefined.enter_context(pl_module.model.unrefined())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.unrefined.close()  # the model's own settings back

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.unrefined.close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.unrefined.close()
