"""The shipped weights (weights/, README "Decompose without training") and the weights-only
file format of ``DTISprites.save_weights``."""

from pathlib import Path

import h5py
import torch
from small_model import SMALL_MODEL

from dti_sprites.datamodules.pipeline.convert import convert
from dti_sprites.decompose import main as decompose
from dti_sprites.io import partial_path
from dti_sprites.metrics import ari_per_image
from dti_sprites.model import DTISprites

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "weights" / "tetrominoes_demo.pt"
REAL = ROOT / "tests" / "data" / "tetrominoes_mini.tfrecords"


def test_save_weights_round_trips_the_model_and_keeps_no_training_state(tmp_path):
    torch.manual_seed(0)
    model = DTISprites(**SMALL_MODEL).eval()
    with torch.no_grad():
        model.sprites.mask.add_(torch.randn_like(model.sprites.mask))  # not the init
    path = tmp_path / "w.pt"
    model.save_weights(path)
    assert path.is_file() and not partial_path(path).exists()
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {"dti_sprites_model", "state_dict"}  # no optimizer or callback state
    loaded = DTISprites.from_checkpoint(path)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        assert torch.equal(model(x).sprite_choice, loaded(x).sprite_choice)


def test_the_shipped_weights_decompose_the_real_records(tmp_path):
    """The README's command on the 10 real DeepMind Tetrominoes records: the shipped demo
    weights find the pieces (ARI-FG 86.7 on ``instance_fg``, as the evaluation scores it, when
    they were shipped; the floor leaves room for kernels that round differently, not for a
    broken model or file)."""
    assert SHIPPED.stat().st_size < 5e6  # weights only
    data = tmp_path / "real.h5"
    convert("tetrominoes", REAL, data, progress=False)
    out = tmp_path / "predictions.h5"
    assert decompose(["--ckpt", str(SHIPPED), "--input", str(data), "--out", str(out)]) == 0
    with h5py.File(data) as truth, h5py.File(out) as pred:
        target = torch.from_numpy(truth["mask"][:]).long()  # (10, 35, 35) entity labels
        instance = torch.from_numpy(pred["instance_fg"][:]).long()  # (10, 35, 35) layer labels
    ari_fg = ari_per_image(instance, target, foreground_only=True).mean().item()
    assert ari_fg > 0.8, ari_fg
