"""The HDF5 writer of the pipeline: appendable, atomic, on real files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dti_sprites.datamodules.pipeline.hdf5_writer import HDF5Writer


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
