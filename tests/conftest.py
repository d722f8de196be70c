import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dti_sprites.datamodules.base import DTIDataModule
from dti_sprites.datamodules.pipeline.convert import convert
from dti_sprites.datamodules.pipeline.synth import write_synthetic

# Under pytest-xdist (pyproject's `-n 2`) each worker takes its share of the cores, so that the
# workers' torch threads do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tiny convolutions, processes sharing 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (exact comparisons), then restore."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class SquaresDataModule(DTIDataModule):
    """In-memory scenes of 1–2 coloured squares on black, with instance and semantic maps.

    A small stand-in for the multi-object data where a test needs a DataModule but not the
    DeepMind pipeline (that has its own tests and the per-config smoke test).
    """

    eval_protocols = ("paper320", "heldout")
    num_semantic_classes = 3

    def __init__(self, n: int = 16, image_size: int = 20, batch_size: int = 4, seed: int = 0):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(seed)
        images = torch.zeros(n, 3, image_size, image_size)
        mask = torch.zeros(n, image_size, image_size, dtype=torch.long)
        semantic = torch.zeros_like(mask)
        side = image_size // 3
        for i in range(n):
            for obj in range(1, 3):
                r, c = torch.randint(0, image_size - side, (2,), generator=g).tolist()
                cls = int(torch.randint(1, 3, (1,), generator=g))
                images[i, :, r : r + side, c : c + side] = torch.rand(3, 1, 1, generator=g)
                mask[i, r : r + side, c : c + side] = obj
                semantic[i, r : r + side, c : c + side] = cls
        self.data = {"image": images, "mask": mask, "semantic": semantic, "index": torch.arange(n)}

    def _loader(self, shuffle: bool = False) -> DataLoader:
        dataset = [{k: v[i] for k, v in self.data.items()} for i in range(len(self.data["image"]))]
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(), self._loader()]

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def init_images(self, n: int = 100) -> torch.Tensor:
        return self.data["image"][:n]


@pytest.fixture
def squares():
    """Factory of SquaresDataModule."""
    return SquaresDataModule


def _save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="session")
def experiment_data(tmp_path_factory):
    """Tiny data for every DataModule the experiment configs name, in the real on-disk formats.

    Multi-object HDF5 files come from our generator in the exact DeepMind encoding, converted by
    our converter; single-object folders follow torchvision's / the datasets' layouts.
    Returns {DataModule class name: path for ``path`` / ``root``}.
    """
    root = tmp_path_factory.mktemp("experiment_data")
    out = {}
    for module, dataset, source, variant, n in [
        ("TetrominoesDataModule", "tetrominoes", "tetrominoes", None, 12),
        ("MultiDSpritesDataModule", "multi_dsprites", "multi_dsprites", "colored_on_grayscale", 12),
        ("CLEVR6DataModule", "clevr6", "clevr_with_masks", None, 40),
    ]:
        tfrecord = write_synthetic(
            source, root / f"{dataset}.tfrecords", n=n, seed=0, variant=variant
        )
        convert(dataset, tfrecord, root / f"{dataset}.h5", variant=variant, progress=False)
        out[module] = root / f"{dataset}.h5"
    rng = np.random.default_rng(0)

    def noise(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    gtsrb = root / "gtsrb_root" / "gtsrb" / "GTSRB"
    for c in (3, 7, 9, 11, 17, 18, 25, 35):
        _save_image(gtsrb / "Training" / f"{c:05d}" / "00000_00000.ppm", noise(30, 32))
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate((3, 7, 9)):
        _save_image(gtsrb / "Final_Test" / "Images" / f"{i:05d}.ppm", noise(30, 32))
        lines.append(f"{i:05d}.ppm;32;30;1;1;30;28;{c}")
    (gtsrb.parent / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    out["GTSRB8DataModule"] = root / "gtsrb_root"
    svhn = root / "svhn"
    svhn.mkdir()
    for split in ("train", "test", "extra"):
        x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
        scipy.io.savemat(
            svhn / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]])}
        )
    out["SVHNDataModule"] = svhn
    horse = root / "horse"
    for i in range(4):
        _save_image(horse / "horse" / f"h{i}.png", noise(140, 150))
        mask = np.zeros((140, 150), np.uint8)
        mask[30:100, 40:120] = 255
        _save_image(horse / "mask" / f"h{i}.png", mask)
    out["WeizmannHorseDataModule"] = horse
    folder = root / "instagram"
    for i in range(4):
        _save_image(folder / f"post{i}.jpg", noise(150, 200))
    out["ImageFolderDataModule"] = folder
    return out
