"""HDF5 multi-object DataModules: splits, batches, lazy vs in-memory, workers, bad files."""

from __future__ import annotations

import pickle
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from dti_sprites.datamodules.hdf5 import HDF5FormatError, MultiObjectHDF5Dataset
from dti_sprites.datamodules.multi_object import (
    CLEVR6DataModule,
    MultiDSpritesDataModule,
    MultiObjectDataModule,
    ObjectsRoomDataModule,
    TetrominoesDataModule,
    plan_splits,
)

# --------------------------------------------------------------------------------------------
# Fixture files, written with h5py directly (the layout of convert.py)
# --------------------------------------------------------------------------------------------


def write_h5(
    path: Path,
    n: int,
    size: int = 35,
    dataset: str | None = "tetrominoes",
    variant: str | None = None,
    channels: int = 3,
    classes: int = 20,
    semantic: bool = True,
    attrs: dict[str, object] | None = None,
) -> Path:
    """``n`` random records; image pixel (0, 0, 0) of record i is ``i % 256`` (ties order)."""
    rng = np.random.default_rng(n)
    image = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    image[:, 0, 0, 0] = np.arange(n) % 256
    mask = rng.integers(0, 4, (n, size, size), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f["image"] = image
        f["mask"] = mask
        if semantic:
            f["semantic"] = rng.integers(0, classes, (n, size, size), dtype=np.uint8)
        f["visibility"] = np.ones((n, 4), np.float32)
        f["source_index"] = np.arange(n, dtype=np.int64)
        if dataset is not None:
            f.attrs["dataset"] = dataset
        if variant is not None:
            f.attrs["variant"] = variant
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def tetro(path: Path, **overrides: object) -> TetrominoesDataModule:
    """A small-split Tetrominoes DataModule over ``path`` (no worker processes)."""
    args: dict[str, object] = dict(
        batch_size=8, num_workers=0, train_size=40, paper_eval_size=8, heldout_size=10
    )
    args.update(overrides)
    return TetrominoesDataModule(str(path), **args)  # type: ignore[arg-type]


def to_model(dm: MultiObjectDataModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the LightningModule receives (the hook the Trainer runs after the transfer)."""
    return dm.on_after_batch_transfer(batch, 0)


def all_batches(dm: MultiObjectDataModule, loader: torch.utils.data.DataLoader) -> dict:
    batches = [to_model(dm, b) for b in loader]
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def test_paper_protocol_splits_on_a_large_file() -> None:
    s = plan_splits(1_000_000, 60_000, 320, 2000)
    assert (s.train, s.paper320, s.heldout) == (range(60_000), range(320), range(60_000, 62_000))
    assert not s.shrunk


def test_heldout_is_truncated_when_few_records_follow_training() -> None:
    s = plan_splits(61_000, 60_000, 320, 2000)
    assert (s.train, s.heldout, s.shrunk) == (range(60_000), range(60_000, 61_000), False)


def test_heldout_offset_gives_a_test_range_after_the_validation_range() -> None:
    validation = plan_splits(21_000, 20_000, 320, 500)
    test = plan_splits(21_000, 20_000, 320, 500, heldout_offset=500)
    assert validation.train == test.train == range(20_000)
    assert (validation.heldout, test.heldout) == (range(20_000, 20_500), range(20_500, 21_000))
    assert plan_splits(20_700, 20_000, 320, 500, 500).heldout == range(20_500, 20_700)
    assert plan_splits(20_300, 20_000, 320, 500, 500).heldout == range(20_300, 20_300)
    with pytest.raises(ValueError, match="heldout_offset=5 needs a file that holds"):
        plan_splits(100, 200, 8, 10, heldout_offset=5)


def test_file_of_exactly_the_training_set_keeps_the_paper_protocol() -> None:
    """The standard CLEVR6 file (34,963 filtered scenes): all of it trains, no held-out."""
    s = plan_splits(34_963, 34_963, 320, 2000)
    assert (s.train, s.paper320, s.heldout, s.shrunk) == (
        range(34_963),
        range(320),
        range(0),
        False,
    )


@pytest.mark.parametrize(
    ("n", "train", "heldout"),
    [
        (34_962, range(32_962), range(32_962, 34_962)),  # one record short: split the file
        (50, range(40), range(40, 50)),  # a fifth at most goes to held-out
        (4, range(4), range(4, 4)),  # too small for a held-out record
    ],
)
def test_small_file_takes_heldout_from_the_end(n: int, train: range, heldout: range) -> None:
    s = plan_splits(n, 34_963, 320, 2000)
    assert (s.train, s.heldout, s.shrunk) == (train, heldout, True)
    assert s.paper320 == range(min(320, len(train)))


def test_splits_never_overlap_and_stay_in_the_file() -> None:
    for n in (1, 2, 7, 39, 40, 41, 45, 50, 51, 100, 1000):
        for train_size, heldout_size in ((40, 0), (40, 10), (40, 1000), (1, 5)):
            s = plan_splits(n, train_size, 8, heldout_size)
            assert len(s.train) >= 1 and s.train.start == 0
            assert s.heldout.start >= s.train.stop and s.heldout.stop <= n
            assert len(s.train) <= train_size and len(s.heldout) <= heldout_size
            assert s.paper320.stop <= s.train.stop


def test_heldout_size_zero_keeps_everything_for_training(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 30), heldout_size=0, train_size=30)
    assert dm.eval_protocols == ("paper320",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the arguments asked for this
        dm.setup("fit")
    assert dm.splits is not None and dm.splits.train == range(30)
    assert len(dm.val_dataloader()) == 1


def test_datamodule_splits_and_protocols(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 60))
    dm.setup("fit")
    assert dm.eval_protocols == ("paper320", "heldout")
    assert [len(dm.dataset(s)) for s in ("train", "paper320", "heldout")] == [40, 8, 10]
    paper, heldout = (all_batches(dm, loader) for loader in dm.val_dataloader())
    assert paper["index"].tolist() == list(range(8))
    assert heldout["index"].tolist() == list(range(10))  # position in its split
    with h5py.File(tmp_path / "t.h5") as f:
        expected = torch.from_numpy(f["image"][40:50]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(heldout["image"], expected, rtol=0, atol=0)
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [8, 10]


def test_small_file_warns_once(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 30))
    with pytest.warns(UserWarning, match=r"holds 30 records, fewer.*held-out = the last 6") as rec:
        dm.setup("fit")
        dm.setup("test")
    assert len([w for w in rec if "holds 30 records" in str(w.message)]) == 1
    assert dm.splits is not None
    assert (dm.splits.train, dm.splits.heldout) == (range(24), range(24, 30))

    tiny = tetro(write_h5(tmp_path / "tiny.h5", 3))
    with pytest.warns(UserWarning, match="holds 3 records"):
        tiny.setup("fit")
    assert tiny.eval_protocols == ("paper320",)
    assert len(tiny.val_dataloader()) == 1


def test_no_record_after_training_drops_heldout_with_a_warning(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 40))
    with pytest.warns(UserWarning, match=r"holds 40 records, no more than.*no held-out split"):
        dm.setup("fit")
    assert dm.splits is not None and dm.splits.train == range(40)
    assert dm.eval_protocols == ("paper320",)
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [8]


@pytest.mark.parametrize(("split", "start", "length"), [("paper320", 0, 8), ("heldout", 40, 10)])
def test_predict_split(tmp_path: Path, split: str, start: int, length: int) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 60), predict_split=split)
    dm.setup("predict")
    batch = all_batches(dm, dm.predict_dataloader())
    first_pixel = (batch["image"][:, 0, 0, 0] * 255).round().long()
    assert first_pixel.tolist() == list(range(start, start + length))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def test_batch_contract(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 60))
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert raw["image"].dtype == torch.uint8  # travels as uint8
    batch = to_model(dm, raw)
    assert batch["image"].shape == (8, 3, 35, 35) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["mask"].shape == batch["semantic"].shape == (8, 35, 35)
    assert batch["mask"].dtype == batch["semantic"].dtype == torch.int64
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (8,)
    with h5py.File(tmp_path / "t.h5") as f:
        rows = batch["index"].numpy()  # train positions == file records
        image = f["image"][...][rows]
        mask, semantic = f["mask"][...][rows], f["semantic"][...][rows]
    assert torch.equal(
        (batch["image"] * 255).round().byte(), torch.from_numpy(image).permute(0, 3, 1, 2)
    )
    assert torch.equal(batch["mask"], torch.from_numpy(mask).long())
    assert torch.equal(batch["semantic"], torch.from_numpy(semantic).long())
    assert dm.image_size == (35, 35) and dm.num_semantic_classes == 20


def test_train_loader_covers_the_training_split_once(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 60))
    dm.setup("fit")
    indices = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert sorted(indices.tolist()) == list(range(40))
    assert indices.tolist() != list(range(40))  # shuffled


def test_in_memory_and_lazy_give_identical_batches(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "t.h5", 60)
    lazy, memory = tetro(path), tetro(path, in_memory=True)
    for dm in (lazy, memory):
        dm.setup("fit")
    assert memory.dataset("train").arrays is not None and lazy.dataset("train").arrays is None
    assert memory.dataset("paper320").arrays["image"].base is not None  # a view of train's
    for split in ("train", "paper320", "heldout"):
        a, b = lazy.dataset(split), memory.dataset(split)
        for order in (list(range(len(a))), [5, 1, 5, 0, len(a) - 1]):
            for x, y in zip(a.__getitems__(order), b.__getitems__(order), strict=True):
                assert x.keys() == y.keys()
                assert all(torch.equal(x[k], y[k]) for k in x)
    for loader_a, loader_b in zip(lazy.val_dataloader(), memory.val_dataloader(), strict=True):
        xa, xb = all_batches(lazy, loader_a), all_batches(memory, loader_b)
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
    torch.manual_seed(3)
    xa = all_batches(lazy, lazy.train_dataloader())
    torch.manual_seed(3)
    xb = all_batches(memory, memory.train_dataloader())
    assert all(torch.equal(xa[k], xb[k]) for k in xa)


def test_getitem_and_getitems_agree(tmp_path: Path) -> None:
    ds = MultiObjectHDF5Dataset(write_h5(tmp_path / "t.h5", 20), 5, 15)
    batch = ds.__getitems__([9, 0, 3])
    for j, i in enumerate([9, 0, 3]):
        assert all(torch.equal(batch[j][k], ds[i][k]) for k in batch[j])
    assert int(ds[-1]["index"]) == 9 and int(ds[-1]["image"][0, 0, 0]) == 14
    with pytest.raises(IndexError):
        ds.__getitems__([10])


def _shutdown(loader: torch.utils.data.DataLoader) -> None:
    """Stop persistent workers now (what Lightning does at teardown), not at a later gc."""
    if loader._iterator is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


def test_lazy_dataset_is_picklable_and_works_in_workers(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "t.h5", 60)
    dm = tetro(path, num_workers=2)
    dm.setup("fit")
    ds = dm.dataset("train")
    ds[0]  # opens a handle in this process; it must not travel with the pickle
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None and torch.equal(clone[3]["image"], ds[3]["image"])
    loaders = [*dm.val_dataloader(), dm.train_dataloader()]
    try:
        paper, heldout, train = (all_batches(dm, loader) for loader in loaders)
        assert all(loader.persistent_workers and loader.num_workers == 2 for loader in loaders)
    finally:
        for loader in loaders:
            _shutdown(loader)
    reference = tetro(path)
    reference.setup("fit")
    expected = all_batches(reference, reference.val_dataloader()[1])
    assert all(torch.equal(heldout[k], expected[k]) for k in expected)
    assert paper["index"].tolist() == list(range(8))
    assert sorted(train["index"].tolist()) == list(range(40))
    ds.close()
    clone.close()


def test_init_images(tmp_path: Path) -> None:
    dm = tetro(write_h5(tmp_path / "t.h5", 60))
    dm.setup("fit")
    images = dm.init_images(5)
    assert images.shape == (5, 3, 35, 35) and images.dtype == torch.float32
    with h5py.File(tmp_path / "t.h5") as f:
        expected = torch.from_numpy(f["image"][:5]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(images, expected)
    assert dm.init_images(1000).shape[0] == 40  # at most the training split


def test_objects_room_has_no_semantic(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "o.h5", 12, size=64, dataset="objects_room", semantic=False)
    dm = ObjectsRoomDataModule(str(path), batch_size=4, num_workers=0, train_size=8, heldout_size=4)
    dm.setup("fit")
    batch = to_model(dm, next(iter(dm.train_dataloader())))
    assert set(batch) == {"image", "mask", "index"}
    assert batch["image"].shape == (4, 3, 64, 64) and dm.num_semantic_classes == 0


def test_multi_dsprites_binarized_becomes_rgb(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "b.h5",
        12,
        size=64,
        dataset="multi_dsprites",
        variant="binarized",
        channels=1,
        classes=4,
    )
    dm = MultiDSpritesDataModule(str(path), variant="binarized", batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="holds 12 records"):
        dm.setup("fit")
    batch = to_model(dm, next(iter(dm.val_dataloader()[0])))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])
    assert dm.num_semantic_classes == 4


def test_multi_dsprites_default_path_follows_the_variant() -> None:
    dm = MultiDSpritesDataModule(variant="colored_on_colored")
    assert dm.path == Path("data/multi_dsprites_colored_on_colored.h5")
    assert dm.image_size == (64, 64)
    with pytest.raises(ValueError, match="unknown variant 'gray' for multi_dsprites"):
        MultiDSpritesDataModule(variant="gray")  # type: ignore[arg-type]


def test_clevr6_semantic_classes_from_the_file(tmp_path: Path) -> None:
    # Without a file: background + shape × material = 7.
    assert CLEVR6DataModule(str(tmp_path / "none.h5")).num_semantic_classes == 7
    path = write_h5(
        tmp_path / "c.h5",
        12,
        size=128,
        dataset="clevr6",
        classes=9,
        attrs={"num_semantic_classes": 9},
    )
    dm = CLEVR6DataModule(str(path), num_workers=0)
    assert dm.num_semantic_classes == 9 and dm.image_size == (128, 128)
    assert dm.train_size == 34_963

    late = CLEVR6DataModule(str(tmp_path / "late.h5"), num_workers=0, train_size=10)  # no file yet
    assert late.num_semantic_classes == 7
    path.rename(tmp_path / "late.h5")
    with pytest.warns(UserWarning, match="'num_semantic_classes' is 9; using it instead of 7"):
        late.setup("fit")
    assert late.num_semantic_classes == 9


def test_defaults() -> None:
    dm = TetrominoesDataModule()
    assert dm.path == Path("data/tetrominoes.h5") and dm.batch_size == 32
    assert (dm.train_size, dm.paper_eval_size, dm.heldout_size) == (60_000, 320, 2000)
    assert dm.num_workers == 2 and not dm.in_memory and dm.predict_split == "paper320"
    assert ObjectsRoomDataModule().path == Path("data/objects_room.h5")
    assert CLEVR6DataModule().path == Path("data/clevr6.h5")
    with pytest.raises(ValueError, match="choose one"):
        TetrominoesDataModule(download=True, generate=10)
    with pytest.raises(ValueError, match="train_size must be > 0"):
        TetrominoesDataModule(train_size=0)


# --------------------------------------------------------------------------------------------
# Bad files: a clear error at setup naming the file, the key and what was expected
# --------------------------------------------------------------------------------------------


def test_missing_file_names_the_command_that_creates_it(tmp_path: Path) -> None:
    dm = tetro(tmp_path / "data" / "tetrominoes.h5")
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"{tmp_path / 'data' / 'tetrominoes.h5'} not found" in message
    assert f"dti-sprites-data download --dataset tetrominoes --root {tmp_path / 'data'}" in message
    assert "dti-sprites-data convert --dataset tetrominoes" in message

    md = MultiDSpritesDataModule(str(tmp_path / "m.h5"), variant="binarized")
    with pytest.raises(FileNotFoundError, match="--dataset multi_dsprites --variant binarized"):
        md.setup("fit")


def _bad_files(tmp_path: Path) -> list[tuple[str, Path, str]]:
    """(case, file, expected message) for a Tetrominoes DataModule."""
    cases = []

    def case(name: str, message: str, **kwargs: object) -> Path:
        path = tmp_path / f"{name}.h5"
        write_h5(path, 20, **kwargs)  # type: ignore[arg-type]
        cases.append((name, path, message))
        return path

    case(
        "other_dataset",
        r"attribute 'dataset' is 'clevr6', expected 'tetrominoes'",
        dataset="clevr6",
    )
    case(
        "other_size",
        r"'image' has shape \(20, 64, 64, 3\), expected \(N, 35, 35, 3\)",
        dataset=None,
        size=64,
    )
    case("labels", r"'semantic' holds label 2[0-9] .* expected labels < 20", classes=30)
    with h5py.File(
        case("no_mask", r"missing dataset 'mask', expected \(N, 35, 35\) uint8"), "a"
    ) as f:
        del f["mask"]
    with h5py.File(case("float_image", r"'image' has dtype float32, expected uint8"), "a") as f:
        image = f["image"][...]
        del f["image"]
        f["image"] = image.astype(np.float32)
    with h5py.File(case("flat_mask", r"'mask' has shape \(20, 35, 35, 1\)"), "a") as f:
        mask = f["mask"][...]
        del f["mask"]
        f["mask"] = mask[..., None]
    with h5py.File(
        case("short_semantic", r"'semantic' holds 19 records but 'image' holds 20"), "a"
    ) as f:
        semantic = f["semantic"][:19]
        del f["semantic"]
        f["semantic"] = semantic
    with h5py.File(case("empty", r"'image' holds no records"), "a") as f:
        for key in ("image", "mask", "semantic"):
            shape = f[key].shape
            del f[key]
            f[key] = np.zeros((0, *shape[1:]), np.uint8)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    cases.append(("garbage", garbage, "not a readable HDF5 file"))
    return cases


def test_bad_files_fail_at_setup_naming_file_key_and_expectation(tmp_path: Path) -> None:
    cases = _bad_files(tmp_path)
    assert len(cases) == 9
    for _name, path, message in cases:
        dm = tetro(path)
        with pytest.raises(HDF5FormatError, match=message) as err:
            dm.setup("fit")
        assert str(err.value).startswith(f"{path}: ")


def test_wrong_variant_is_rejected(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "m.h5",
        20,
        size=64,
        dataset="multi_dsprites",
        variant="colored_on_colored",
        classes=4,
    )
    dm = MultiDSpritesDataModule(str(path), variant="colored_on_grayscale")
    with pytest.raises(HDF5FormatError, match="'variant' is 'colored_on_colored'"):
        dm.setup("fit")


class _Probe(L.LightningModule):
    """Records what the training step receives."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append({k: v.clone() for k, v in batch.items()})
        return (batch["image"].mean() - self.weight) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer() -> L.Trainer:
    return L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def test_trainer_gets_contract_batches_and_bad_files_stop_it_first(tmp_path: Path) -> None:
    model = _Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and logging
        _trainer().fit(model, datamodule=tetro(write_h5(tmp_path / "t.h5", 60)))
    assert len(model.seen) == 2
    batch = model.seen[0]
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 35, 35)
    assert batch["mask"].dtype == torch.int64 and batch["semantic"].dtype == torch.int64

    model = _Probe()
    bad = write_h5(tmp_path / "bad.h5", 60, dataset="objects_room")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HDF5FormatError, match="attribute 'dataset' is 'objects_room'"):
            _trainer().fit(model, datamodule=tetro(bad))
    assert model.seen == []


# --------------------------------------------------------------------------------------------
# synth -> convert -> DataModule, generate and download
# --------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    (TetrominoesDataModule, None, 24, 4),
    (MultiDSpritesDataModule, "colored_on_grayscale", 16, 6),
    (MultiDSpritesDataModule, "colored_on_colored", 16, 5),
    (MultiDSpritesDataModule, "binarized", 16, 4),
    (CLEVR6DataModule, None, 24, 7),  # ≤ 6 objects + background after the filter
    (ObjectsRoomDataModule, None, 16, 7),
]


@pytest.mark.parametrize(
    ("cls", "variant", "n", "entities"), ROUND_TRIPS, ids=lambda v: getattr(v, "__name__", v)
)
def test_generate_round_trip(
    tmp_path: Path, cls: type[MultiObjectDataModule], variant: str | None, n: int, entities: int
) -> None:
    from dti_sprites.datamodules.pipeline.synth import synthesize

    path = tmp_path / "data" / "generated.h5"
    extra = {} if variant is None else {"variant": variant}
    dm = cls(
        str(path),
        batch_size=4,
        num_workers=0,
        train_size=10,
        paper_eval_size=4,
        heldout_size=3,
        generate=n,
        seed=5,
        **extra,
    )
    assert not path.exists()
    dm.prepare_data()
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["generated.h5"]  # no temporary left
    with h5py.File(path) as f:
        assert f.attrs["dataset"] == dm.dataset_name
        n_records = len(f["image"])
        source_index = f["source_index"][...]
    if cls is CLEVR6DataModule:
        assert 0 < n_records < n  # the ≤ 6 objects filter dropped scenes
    else:
        assert n_records == n
    mtime = path.stat().st_mtime_ns
    dm.prepare_data()  # the file exists: nothing is regenerated
    assert path.stat().st_mtime_ns == mtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small file: splits shrink (tested above)
        dm.setup("fit")
    h, w = dm.image_size
    batch = all_batches(dm, dm.val_dataloader()[0])
    assert batch["image"].shape == (4, 3, h, w) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, h, w) and batch["mask"].dtype == torch.int64
    assert 0 <= int(batch["mask"].min()) and int(batch["mask"].max()) < entities
    assert (batch["mask"] > 0).any()
    if dm.num_semantic_classes:
        assert batch["semantic"].dtype == torch.int64
        assert int(batch["semantic"].max()) < dm.num_semantic_classes
        assert torch.equal(batch["semantic"] > 0, batch["mask"] > 0)  # classes on objects only
    else:
        assert "semantic" not in batch
    if cls is not CLEVR6DataModule:  # no crop / resize: the pixels are the generator's
        records = list(synthesize(dm.dataset_name, n, seed=5, variant=variant))
        for j, i in enumerate(source_index[:4]):
            image = torch.from_numpy(records[i]["image"]).permute(2, 0, 1).float() / 255
            assert torch.equal(batch["image"][j], image.expand(3, h, w))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_prepare_data_downloads_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dti_sprites.datamodules.catalog import get_schema
    from dti_sprites.datamodules.pipeline.synth import write_synthetic

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    served = tmp_path / "bucket"
    src = served / get_schema("tetrominoes").source
    src.parent.mkdir(parents=True)
    write_synthetic("tetrominoes", src, n=20, seed=2)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        path = tmp_path / "data" / "tetro.h5"
        off = tetro(path, download_base_url=url)
        off.prepare_data()
        assert not path.exists()  # download=False: never fetches
        dm = tetro(path, download=True, download_base_url=url, train_size=12, heldout_size=8)
        dm.prepare_data()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert path.is_file()
    assert (tmp_path / "data" / "tetrominoes_train.tfrecords").read_bytes() == src.read_bytes()
    dm.setup("fit")
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [8, 8]
    batch = to_model(dm, next(iter(dm.train_dataloader())))
    assert batch["image"].shape == (8, 3, 35, 35)
