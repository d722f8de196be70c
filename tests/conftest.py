import pytest
import torch
from torch.utils.data import DataLoader

from dti_sprites.datamodules.base import DTIDataModule


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
        self.data = {"image": images, "mask": mask, "semantic": semantic,
                     "index": torch.arange(n)}  # fmt: skip

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
