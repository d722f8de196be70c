"""The HDF5 module: the appendable atomic writer, and the layout check, on real files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dti_sprites.datamodules.hdf5 import HDF5FormatError, HDF5Writer, check_file, read_attr


def _rows(start: int, n: int) -> dict[str, np.ndarray]:
    """``n`` rows: image (n, 2, 3, 3) uint8 filled with the row number, index, a string."""
    index = np.arange(start, start + n, dtype=np.int64)
    image = np.broadcast_to(index[:, None, None, None], (n, 2, 3, 3)).astype(np.uint8)
    return {"image": image, "index": index, "path": np.array([f"r{i}" for i in index], object)}


def test_writer_appends_batches_and_renames_on_commit(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.h5"
    writer = HDF5Writer(out, attrs={"source": "test"}, compression="gzip")
    writer.append(_rows(0, 3))
    writer.append(_rows(3, 2))
    writer.attrs["rows"] = writer.count
    assert not out.exists() and (tmp_path / "sub" / "out.h5.partial").is_file()
    assert writer.close() == out
    assert not (tmp_path / "sub" / "out.h5.partial").exists()
    with h5py.File(out) as f:
        assert f["index"][()].tolist() == [0, 1, 2, 3, 4]
        assert f["image"].shape == (5, 2, 3, 3) and f["image"].dtype == np.uint8
        assert f["image"][4].tolist() == [[[4] * 3] * 3] * 2
        assert [p.decode() for p in f["path"][()]] == ["r0", "r1", "r2", "r3", "r4"]
        assert f["image"].compression == "gzip"
        assert dict(f.attrs) == {"source": "test", "rows": 5}


def test_zero_rows_create_the_datasets(tmp_path: Path) -> None:
    with HDF5Writer(tmp_path / "empty.h5") as writer:
        writer.append({"mask": np.zeros((0, 4, 5), np.uint8)})
    with h5py.File(tmp_path / "empty.h5") as f:
        assert f["mask"].shape == (0, 4, 5) and f["mask"].maxshape == (None, 4, 5)


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    out.write_bytes(b"the previous file")
    with pytest.raises(RuntimeError, match="stop"), HDF5Writer(out) as writer:
        writer.append(_rows(0, 2))
        raise RuntimeError("stop")
    assert out.read_bytes() == b"the previous file"
    assert list(tmp_path.iterdir()) == [out]


def test_batches_must_agree(tmp_path: Path) -> None:
    with HDF5Writer(tmp_path / "out.h5") as writer:
        writer.append(_rows(0, 2))
        with pytest.raises(ValueError, match="keys"):
            writer.append({"image": _rows(2, 1)["image"]})
        with pytest.raises(ValueError, match=r"different lengths \[1, 2\]"):
            writer.append({**_rows(2, 2), "index": np.arange(1)})


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
