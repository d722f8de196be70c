"""Callbacks that decide *when* things happen during training; they call small public model
methods and keep their counters in ``state_dict()`` so a resumed run continues exactly.

The scheduled ones share :class:`ScheduledCallback` (their time unit, step counter, events and
state) and a :class:`~dti_sprites.schedule.Schedule`; their events make up the run's event
log (:func:`event_log`), which the :class:`SpriteDashboard` shows. The LR drops are no callback:
``DTISpritesModule(lr_drops=…)`` returns them to Lightning as its LR scheduler."""

from dti_sprites.callbacks.base import Event, ScheduledCallback, event_log
from dti_sprites.callbacks.curriculum import Curriculum
from dti_sprites.callbacks.dashboard import SpriteDashboard
from dti_sprites.callbacks.eval_report import EvalReport
from dti_sprites.callbacks.freeze import SpriteFreeze
from dti_sprites.callbacks.layer_reset import LayerReset
from dti_sprites.callbacks.predictions import PredictionWriter
from dti_sprites.callbacks.preemption import Preempted, Preemption
from dti_sprites.callbacks.reassignment import SpriteReassignment
from dti_sprites.callbacks.refinement import ValidationRefinement
from dti_sprites.callbacks.run_dir import run_dir
from dti_sprites.callbacks.seeding import SpriteSeeding

__all__ = [
    "Curriculum",
    "EvalReport",
    "Event",
    "LayerReset",
    "PredictionWriter",
    "Preempted",
    "Preemption",
    "ScheduledCallback",
    "SpriteDashboard",
    "SpriteFreeze",
    "SpriteReassignment",
    "SpriteSeeding",
    "ValidationRefinement",
    "event_log",
    "run_dir",
]
