"""Where a run's files go, and its CSV tables."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from dti_sprites.io import atomic_write


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: ``<save_dir>/<name>/<version>`` of the first logger (Lightning's own
    layout), or ``default_root_dir`` without one. The CLI puts the logger's ``save_dir`` at
    ``default_root_dir``, so the run folder lies in the run's root."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version


def save_csv(rows: Sequence[Sequence[Any]], columns: Sequence[str], path: Path) -> None:
    """Write a CSV table atomically (temp file, then rename)."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
