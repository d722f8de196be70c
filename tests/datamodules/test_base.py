"""DTIDataModule: the argument checks and the loader factories every DataModule shares."""

from __future__ import annotations

import pytest
import torch

from dti_sprites.datamodules import GTSRB8DataModule, TetrominoesDataModule
from dti_sprites.datamodules.base import DTIDataModule, check_names
from dti_sprites.datamodules.resumable import ResumableDataLoader


@pytest.mark.parametrize(
    ("cls", "args"), [(TetrominoesDataModule, {}), (GTSRB8DataModule, {"root": "x"})]
)
def test_both_families_check_the_loader_arguments(cls: type, args: dict) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        cls(**args, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        cls(**args, num_workers=-1)
    dm = cls(**args, batch_size=5, num_workers=0, shuffle_seed=3)
    assert (dm.batch_size, dm.num_workers, dm.shuffle_seed) == (5, 0, 3)


@pytest.mark.parametrize("names", [(), ("a", "a"), ("a", "d")])
def test_check_names_wants_distinct_known_names(names: tuple[str, ...]) -> None:
    check_names("splits", ("c", "a"), ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"^splits must be distinct names among \('a', 'b', 'c'\)"):
        check_names("splits", names, ("a", "b", "c"))


def test_loader_factories() -> None:
    dm = DTIDataModule(batch_size=3, num_workers=0, shuffle_seed=5)
    data = [{"x": torch.tensor(i)} for i in range(7)]
    train = dm._train_loader(data)
    assert isinstance(train, ResumableDataLoader) and len(train) == 3
    assert sorted(x for batch in train for x in batch["x"].tolist()) == list(range(7))
    assert [batch["x"].tolist() for batch in dm._eval_loader(data)] == [[0, 1, 2], [3, 4, 5], [6]]
