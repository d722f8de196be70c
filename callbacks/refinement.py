"""When validation refines: the model's refinement at evaluation only from a given step on."""

from __future__ import annotations

from contextlib import ExitStack

import lightning as L
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.utilities import rank_zero_warn

from dti_sprites.callbacks.eval_report import EvalReport


class ValidationRefinement(L.Callback):
    """Validations before step ``from_step`` score the network's own selection, unrefined,
    except the one that ends a fit stopped early.

    The model's refinement at evaluation (``DTISprites(pose_refinement, order_search, …)``,
    docs/method.md §11) makes a validation several times slower: on a CPU, minutes per
    validation for Multi-dSprites. With this callback the validations that only draw the
    learning curve (the sanity check included) skip it, and those from ``from_step`` on (give
    the last step, ``trainer.max_steps``, to refine the final one only) are refined as the
    model says, as is the validation that Lightning runs when a fit stops early
    (``trainer.should_stop``: ``max_time``, early stopping), the fit's last. Test and predict
    always are. The model's settings are put back at the end of
    each validation, so checkpoints, weights and everything after validation see the model's
    own; the choice is a function of the step, so a resumed run validates as an uninterrupted
    one. List it after :class:`~dti_sprites.callbacks.EvalReport`, whose worst images are
    decomposed again at the end of the validation: then they are drawn as they were scored.

    Args:
        from_step: the first step (optimizer steps done) whose validation is refined.
    """

    def __init__(self, from_step: NonNegativeInt = 0) -> None:
        self.from_step = int(from_step)
        self.unrefined = ExitStack()  # holds the model's unrefined() during a validation

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        after = trainer.callbacks[trainer.callbacks.index(self) + 1 :]
        if any(isinstance(callback, EvalReport) for callback in after):
            rank_zero_warn(
                "ValidationRefinement is listed before EvalReport: the worst images of an "
                "unrefined validation are drawn refined (list it after EvalReport)"
            )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step < self.from_step and not trainer.should_stop:
            self.unrefined.enter_context(pl_module.model.unrefined())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.unrefined.close()  # the model's own settings back
