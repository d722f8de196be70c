"""benchmarks/score_checkpoint.py: the harness's scores of a saved model on a range of records."""

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dti_sprites.model import DTISprites

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "score_checkpoint.py"
spec = importlib.util.spec_from_file_location("score_checkpoint", SCRIPT)
scoring = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scoring)


def square_file(path: Path, shifts: list[int]) -> Path:
    """Records of a 6×6 grey square on black (20×20), moved right by each shift from pixels
    7..12: ``image``, ``mask`` (1 on the square) and ``semantic`` (class 1 on the square)."""
    n = len(shifts)
    mask = np.zeros((n, 20, 20), dtype=np.uint8)
    for i, dx in enumerate(shifts):
        mask[i, 7:13, 7 + dx : 13 + dx] = 1
    image = np.repeat((mask * 230)[..., None], 3, axis=-1).astype(np.uint8)  # 0.9 grey
    with h5py.File(path, "w") as f:
        f["image"], f["mask"], f["semantic"] = image, mask, mask
    return path


def square_model() -> DTISprites:
    """One layer drawing the 6×6 square sprite at the initial placement (pixels 7..12)."""
    model = DTISprites(image_size=20, n_sprites=1, n_layers=1, sprite_size=10, mask_noise=0.0)
    square = torch.zeros(10, 10)
    square[2:8, 2:8] = 1
    with torch.no_grad():
        model.sprites.mask.copy_(square[None, None])
    return model.eval()


def test_a_model_that_draws_the_objects_scores_full_marks_and_a_shift_costs_iou(tmp_path):
    path = square_file(tmp_path / "squares.h5", [0, 0, 3, 3])
    on = scoring.score(square_model(), path, first=0, count=2, batch_size=1)
    assert on["mIoU"] == pytest.approx(100) and on["mACC"] == pytest.approx(100)
    off = scoring.score(square_model(), path, first=2, count=2)
    # drawn 3 px left of the squares: 18 of their 36 pixels right; background 346 of 364
    assert off["mIoU"] == pytest.approx(100 * (18 / 54 + 346 / 382) / 2, abs=0.01)
    assert off["mACC"] == pytest.approx(100 * (18 / 36 + 346 / 364) / 2, abs=0.01)
    refined = square_model()
    refined.set_pose_refinement(150, 0.02)
    assert scoring.score(refined, path, first=2, count=2)["mIoU"] > off["mIoU"] + 30


def test_a_range_past_the_file_is_an_error_naming_it(tmp_path):
    path = square_file(tmp_path / "squares.h5", [0, 0])
    with pytest.raises(ValueError, match=r"squares\.h5 has 2 records"):
        scoring.score(square_model(), path, first=1, count=2)
