"""The HDF5 reading side: the layout check and the attributes, on files written by the writer."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dti_sprites.datamodules.hdf5 import HDF5FormatError, check_file, read_attr
from dti_sprites.datamodules.pipeline.hdf5_writer import HDF5Writer


def _dataset_file(path: Path, n: int = 4, classes: int = 3, **extra: np.ndarray) -> Path:
    with HDF5Writer(path, attrs={"dataset": "tetrominoes"}) as writer:
        writer.append(
            {
                "image": np.zeros((n, 6, 7, 3), np.uint8),
                "mask": np.ones((n, 6, 7), np.uint8),
                "semantic": np.full((n, 6, 7), classes - 1, np.uint8),
                **extra,
            }
        )
    return path


def test_check_file_returns_the_shapes_of_the_checked_keys(tmp_path: Path) -> None:
    path = _dataset_file(tmp_path / "d.h5", source_index=np.arange(4) + 100)
    shapes = check_file(path, ("mask",), ("source_index", "absent"), (6, 7), (3,), "tetrominoes")
    assert shapes == {"image": (4, 6, 7, 3), "mask": (4, 6, 7), "source_index": (4,)}
    assert check_file(path, optional=("absent",)) == {"image": (4, 6, 7, 3)}
    assert read_attr(path, "dataset") == "tetrominoes"
    assert read_attr(path, "absent") is None and read_attr(tmp_path / "none.h5", "x") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": (7, 6)}, r"'image' has shape \(4, 6, 7, 3\), expected \(N, 7, 6, 3\)"),
        ({"channels": (1,)}, r"expected \(N, H, W, 1\) uint8 images"),
        ({"dataset": "clevr6"}, "attribute 'dataset' is 'tetrominoes', expected 'clevr6'"),
        ({"keys": ("source_index",)}, r"missing dataset 'source_index', expected \(N,\) integer"),
        ({"keys": ("semantic",), "num_semantic_classes": 2}, "holds label 2 .* labels < 2"),
    ],
)
def test_check_file_names_file_key_and_expectation(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    path = _dataset_file(tmp_path / "d.h5", classes=3)
    with pytest.raises(HDF5FormatError, match=message) as err:
        check_file(path, **kwargs)
    assert str(err.value).startswith(f"{path}: ")


def test_check_file_rejects_float_indices_and_short_keys(tmp_path: Path) -> None:
    path = _dataset_file(tmp_path / "a.h5", source_index=np.zeros(4, np.float32))
    with pytest.raises(HDF5FormatError, match="'source_index' has dtype float32"):
        check_file(path, optional=("source_index",))
    with h5py.File(path, "a") as f:
        del f["source_index"]
        f["source_index"] = np.arange(3)
    with pytest.raises(HDF5FormatError, match="'source_index' holds 3 records but 'image' holds 4"):
        check_file(path, ("source_index",))
