"""Single-object DataModules on small hand-made datasets in the real on-disk formats."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dti_sprites.datamodules.gtsrb import GTSRB8_CLASSES, GTSRB8DataModule
from dti_sprites.datamodules.horse import WeizmannHorseDataModule
from dti_sprites.datamodules.image_files import ImageReadError
from dti_sprites.datamodules.image_folder import ImageFolderDataModule
from dti_sprites.datamodules.svhn import SVHNDataModule

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def _stripes(h: int, w: int, cuts: tuple[int, int], axis: int) -> np.ndarray:
    """Blue | red | green bands along ``axis`` (1: columns, 0: rows), split at ``cuts``."""
    img = _solid(h, w, RED)
    lo = (slice(None), slice(0, cuts[0])) if axis == 1 else (slice(0, cuts[0]),)
    hi = (slice(None), slice(cuts[1], None)) if axis == 1 else (slice(cuts[1], None),)
    img[lo], img[hi] = BLUE, GREEN
    return img


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().to(torch.uint8)


def _check_batch(batch: dict[str, torch.Tensor], size: int, keys: set[str]) -> None:
    assert set(batch) == keys
    b = len(batch["index"])
    assert batch["image"].shape == (b, 3, size, size)
    assert batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["index"].dtype == torch.int64
    if "label" in keys:
        assert batch["label"].shape == (b,) and batch["label"].dtype == torch.int64
    if "mask" in keys:
        assert batch["mask"].shape == (b, size, size) and batch["mask"].dtype == torch.int64
        assert set(batch["mask"].unique().tolist()) <= {0, 1}


# ---------------------------------------------------------------------------------------------
# GTSRB-8
# ---------------------------------------------------------------------------------------------

GTSRB_IDS = (0, 3, 7, 9, 11, 17, 18, 25, 35, 42)  # the 8 kept classes and 2 dropped ones
TEST_IDS = (35, 0, 3, 42, 7)


def _gtsrb_colour(class_id: int, k: int) -> tuple[int, int, int]:
    return (class_id * 6, k * 100, 50)  # class id readable back from the red channel


@pytest.fixture
def gtsrb_root(tmp_path: Path) -> Path:
    """torchvision's GTSRB layout, 2 train images per class, 5 test images."""
    base = tmp_path / "gtsrb"
    for c in GTSRB_IDS:
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        for k in range(2):
            _save(folder / f"00000_{k:05d}.ppm", _solid(25 + k, 30 + c % 5, _gtsrb_colour(c, k)))
        (folder / f"GT-{c:05d}.csv").write_text("Filename;ClassId\n")  # as in the real archive
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate(TEST_IDS):
        _save(
            base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", _solid(40, 33, (c * 6, 0, 9))
        )
        lines.append(f"{i:05d}.ppm;33;40;5;5;28;35;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def _class_ids(dataset: torch.utils.data.Dataset) -> list[int]:
    return [int(_to_uint8(dataset[i]["image"])[0, 0, 0]) // 6 for i in range(len(dataset))]


@pytest.mark.parametrize("in_memory", [True, False])
def test_gtsrb8_keeps_eight_classes_and_relabels_them(gtsrb_root: Path, in_memory: bool) -> None:
    dm = GTSRB8DataModule(str(gtsrb_root), batch_size=4, num_workers=0, in_memory=in_memory)
    dm.setup("fit")
    train, test = dm.train_set(), dm.split("test")
    assert dm.num_classes == 8 and dm.image_size == (28, 28)
    assert len(train) == 16  # 8 classes × 2, classes 0 and 42 dropped
    assert _class_ids(train) == [c for c in GTSRB8_CLASSES for _ in range(2)]
    assert [int(train[i]["label"]) for i in range(16)] == [i // 2 for i in range(16)]
    assert _class_ids(test) == [35, 3, 7]  # CSV order, 0 and 42 dropped
    assert [int(test[i]["label"]) for i in range(3)] == [7, 0, 1]
    assert [int(test[i]["index"]) for i in range(3)] == [0, 1, 2]
    _check_batch(next(iter(dm.train_dataloader())), 28, {"image", "label", "index"})
    (val,) = dm.val_dataloader()
    _check_batch(next(iter(val)), 28, {"image", "label", "index"})


def test_gtsrb8_in_memory_and_on_disk_agree(gtsrb_root: Path) -> None:
    kept = GTSRB8DataModule(str(gtsrb_root), num_workers=2, in_memory=True).train_set()
    lazy = GTSRB8DataModule(str(gtsrb_root), num_workers=0, in_memory=False).train_set()
    for i in range(len(lazy)):
        a, b = kept[i], lazy[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gtsrb8_resizes_the_full_image(gtsrb_root: Path) -> None:
    first = gtsrb_root / "gtsrb" / "GTSRB" / "Training" / "00003" / "00000_00000.ppm"
    _save(first, _stripes(20, 40, (10, 30), axis=1))  # blue | red | green, 40 wide
    image = _to_uint8(GTSRB8DataModule(str(gtsrb_root), num_workers=0).train_set()[0]["image"])
    # Stretched, not cropped: both outer bands survive at the borders.
    assert image[:, :, 0].tolist() == [[0] * 28, [0] * 28, [255] * 28]
    assert image[:, :, 14].tolist() == [[255] * 28, [0] * 28, [0] * 28]
    assert image[:, :, 27].tolist() == [[0] * 28, [255] * 28, [0] * 28]


def test_gtsrb8_eval_protocols_order(gtsrb_root: Path) -> None:
    dm = GTSRB8DataModule(str(gtsrb_root), num_workers=0, eval_protocols=("test", "train"))
    dm.setup("validate")
    for loaders in (dm.val_dataloader(), dm.test_dataloader()):
        assert [len(loader.dataset) for loader in loaders] == [3, 16]
    assert len(dm.predict_dataloader().dataset) == 3
    images = dm.init_images(5)
    assert images.shape == (5, 3, 28, 28) and torch.equal(images, dm.init_images(5))
    assert torch.equal(images[4], dm.train_set()[4]["image"])


def test_gtsrb8_missing_files_fail_at_setup(gtsrb_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.gtsrb not found.*download=True"):
        GTSRB8DataModule(str(tmp_path / "nowhere")).setup("fit")
    csv = gtsrb_root / "gtsrb" / "GT-final_test.csv"
    csv.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(csv))):
        GTSRB8DataModule(str(gtsrb_root), num_workers=0).setup("fit")  # eval split checked too
    for ppm in (gtsrb_root / "gtsrb" / "GTSRB" / "Training" / "00025").glob("*.ppm"):
        ppm.unlink()
    with pytest.raises(FileNotFoundError, match=r"00025 holds no \.ppm image"):
        GTSRB8DataModule(str(gtsrb_root), eval_protocols=("train",)).setup("fit")


def test_gtsrb8_corrupt_image_is_named(gtsrb_root: Path) -> None:
    bad = gtsrb_root / "gtsrb" / "GTSRB" / "Training" / "00007" / "00000_00001.ppm"
    bad.write_bytes(b"P6 not really")
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        GTSRB8DataModule(str(gtsrb_root), num_workers=0, eval_protocols=("train",)).setup("fit")


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="eval_protocols"):
        GTSRB8DataModule("x", eval_protocols=("val",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        SVHNDataModule("x", batch_size=0)
    with pytest.raises(ValueError, match="splits"):
        SVHNDataModule("x", splits=())


# ---------------------------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------------------------

SVHN_LABELS = {"train": [10, 1, 2, 10, 9], "test": [3, 10, 4], "extra": [5, 6, 10, 7]}


@pytest.fixture
def svhn_root(tmp_path: Path) -> Path:
    """torchvision's SVHN files: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0."""
    rng = np.random.default_rng(0)
    for split, labels in SVHN_LABELS.items():
        x = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        y = np.array(labels, dtype=np.uint8)[:, None]
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    return tmp_path


def test_svhn_concatenates_splits_and_maps_10_to_0(svhn_root: Path) -> None:
    dm = SVHNDataModule(str(svhn_root), batch_size=5, num_workers=0)
    dm.setup("fit")
    train = dm.train_set()
    assert len(train) == 12 and dm.num_classes == 10 and dm.image_size == (32, 32)
    labels = [int(train[i]["label"]) for i in range(12)]
    assert labels == [0, 1, 2, 0, 9, 3, 0, 4, 5, 6, 0, 7]
    assert [int(train[i]["index"]) for i in range(12)] == list(range(12))
    x = scipy.io.loadmat(svhn_root / "test_32x32.mat")["X"]  # sample 6 = test image 1
    assert torch.equal(_to_uint8(train[6]["image"]), torch.from_numpy(x[..., 1]).permute(2, 0, 1))
    (test,) = dm.test_dataloader()
    batch = next(iter(test))
    _check_batch(batch, 32, {"image", "label", "index"})
    assert batch["label"].tolist() == [3, 0, 4] and batch["index"].tolist() == [0, 1, 2]
    _check_batch(next(iter(dm.train_dataloader())), 32, {"image", "label", "index"})


def test_svhn_missing_split_file(svhn_root: Path) -> None:
    (svhn_root / "extra_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(svhn_root / "extra_32x32.mat"))):
        SVHNDataModule(str(svhn_root), num_workers=0).setup("fit")
    dm = SVHNDataModule(str(svhn_root), num_workers=0, splits=("train", "test"))
    dm.setup("fit")
    assert len(dm.train_set()) == 8


def test_svhn_wrong_content_is_named(svhn_root: Path) -> None:
    bad = svhn_root / "test_32x32.mat"
    scipy.io.savemat(bad, {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r".*\(32, 32, 3, N\)"):
        SVHNDataModule(str(svhn_root), splits=("train",)).setup("fit")


# ---------------------------------------------------------------------------------------------
# Weizmann Horse
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def horse_root(tmp_path: Path) -> Path:
    """Images of three sizes and formats; masks paired by stem (PNG, any nonzero = horse)."""
    root = tmp_path / "weizmann_horse_db"
    _save(root / "horse" / "a.png", _solid(30, 40, RED))
    _save(root / "horse" / "b.jpg", _solid(60, 50, GREEN))
    _save(root / "horse" / "c.png", _solid(64, 64, BLUE))
    left = np.zeros((30, 40), np.uint8)
    left[:, :20] = 255
    top = np.zeros((60, 50), np.uint8)
    top[:30] = 1
    block = np.zeros((64, 64), np.uint8)
    block[16:48, 16:48] = 7
    _save(root / "mask" / "a.png", left)
    _save(root / "mask" / "b.png", top)
    _save(root / "mask" / "c.png", block)
    _save(root / "mask" / "z.png", block)  # a mask without image is ignored
    return root


@pytest.mark.parametrize("in_memory", [True, False])
def test_horse_pairs_by_stem_and_keeps_masks_binary(horse_root: Path, in_memory: bool) -> None:
    dm = WeizmannHorseDataModule(str(horse_root), batch_size=3, num_workers=0, in_memory=in_memory)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    _check_batch(batch, 128, {"image", "mask", "index"})
    image, mask = _to_uint8(batch["image"]), batch["mask"]
    assert image[0, :, 0, 0].tolist() == [255, 0, 0]  # a: red, left half horse
    assert (mask[0, :, :64] == 1).all() and (mask[0, :, 64:] == 0).all()
    assert image[1, 1].min() > 240 and image[1, 0].max() < 15  # b: green JPEG, top half horse
    assert (mask[1, :64] == 1).all() and (mask[1, 64:] == 0).all()
    assert image[2, :, 0, 0].tolist() == [0, 0, 255]  # c: blue, value-7 block scaled ×2
    assert (mask[2, 32:96, 32:96] == 1).all() and int(mask[2].sum()) == 64 * 64
    assert len(dm.train_set()) == 3 and dm.num_classes == 0


def test_horse_masks_are_resized_with_nearest(horse_root: Path) -> None:
    lines = np.zeros((64, 64), np.uint8)
    lines[:, 2::4] = 255  # the columns nearest samples when shrinking 64 -> 16
    _save(horse_root / "mask" / "c.png", lines)
    dm = WeizmannHorseDataModule(str(horse_root), num_workers=0, image_size=16)
    mask = dm.train_set()[2]["mask"]
    assert mask.shape == (16, 16) and (mask == 1).all()  # a smoothing filter would give 0


def test_horse_image_without_mask(horse_root: Path) -> None:
    (horse_root / "mask" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for .*b\.jpg.*mask.b"):
        WeizmannHorseDataModule(str(horse_root)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"nowhere not found"):
        WeizmannHorseDataModule(str(horse_root / "nowhere")).setup("fit")


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def test_image_folder_resizes_short_side_and_crops_the_centre(tmp_path: Path) -> None:
    _save(tmp_path / "a_wide.png", _stripes(100, 200, (50, 150), axis=1))  # 200 wide
    _save(tmp_path / "b" / "tall.png", _stripes(200, 100, (50, 150), axis=0))  # 200 high
    dm = ImageFolderDataModule(str(tmp_path), batch_size=2, num_workers=0, image_size=64)
    dm.setup("fit")
    batch = next(iter(dm.predict_dataloader()))
    _check_batch(batch, 64, {"image", "index"})
    wide, tall = _to_uint8(batch["image"])
    red = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    # The centre 100 × 100 of the original is all red; only the outermost output pixels
    # blend with the neighbouring bands through the antialiasing filter.
    assert (wide[:, :, 1:63] == red).all() and (tall[:, 1:63, :] == red).all()
    assert wide[0, :, 0].min() > 200 and wide[0, :, 63].min() > 200


def test_image_folder_labels_and_masks(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(images / "cats" / "a.png", _solid(40, 40, RED))
    _save(images / "dogs" / "b.jpg", _solid(40, 80, GREEN))
    _save(images / "dogs" / "c.png", _solid(80, 40, BLUE))
    right = np.zeros((40, 80), np.uint8)
    right[:, 40:] = 255  # right half
    _save(masks / "cats" / "a.png", np.full((40, 40), 3, np.uint8))
    _save(masks / "dogs" / "b.png", right)
    _save(masks / "dogs" / "c.png", np.zeros((80, 40), np.uint8))
    dm = ImageFolderDataModule(
        str(images), batch_size=3, num_workers=0, image_size=16, masks_dir=str(masks), labels=True
    )
    dm.setup("fit")
    assert dm.class_names == ("cats", "dogs") and dm.num_classes == 2
    batch = next(iter(dm.val_dataloader()[0]))
    _check_batch(batch, 16, {"image", "mask", "label", "index"})
    assert batch["label"].tolist() == [0, 1, 1]
    assert (batch["mask"][0] == 1).all() and (batch["mask"][2] == 0).all()
    # b: 80 × 40 -> 32 × 16, the crop keeps columns 8..24, of which 16..24 (right half) are object.
    assert (batch["mask"][1, :, 8:] == 1).all() and (batch["mask"][1, :, :8] == 0).all()


def test_image_folder_labels_need_sub_folders(tmp_path: Path) -> None:
    _save(tmp_path / "cats" / "a.png", _solid(8, 8, RED))
    loose = _save(tmp_path / "loose.png", _solid(8, 8, RED))
    with pytest.raises(ValueError, match=re.escape(str(loose))):
        ImageFolderDataModule(str(tmp_path), labels=True).setup("fit")


@pytest.fixture
def messy_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """One good image, a text file named .jpg, a truncated PNG and an ignored .txt."""
    _save(tmp_path / "good.png", _solid(20, 30, RED))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    whole = _save(
        tmp_path / "whole.png",
        np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8),
    )
    truncated = tmp_path / "sub" / "truncated.png"
    truncated.parent.mkdir()
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    (tmp_path / "notes.txt").write_text("captions")
    return tmp_path, bad, truncated


def test_image_folder_invalid_file_raises_naming_it(messy_folder: tuple[Path, Path, Path]) -> None:
    root, bad, truncated = messy_folder
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        ImageFolderDataModule(str(root), num_workers=0).setup("fit")
    bad.unlink()
    with pytest.raises(ImageReadError, match=re.escape(str(truncated))):
        ImageFolderDataModule(str(root), num_workers=2).setup("fit")


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_skips_invalid_files_with_a_warning(
    messy_folder: tuple[Path, Path, Path], in_memory: bool
) -> None:
    root, bad, truncated = messy_folder
    dm = ImageFolderDataModule(str(root), num_workers=0, skip_invalid=True, in_memory=in_memory)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record]
    assert any(str(bad) in m for m in messages) and any(str(truncated) in m for m in messages)
    assert len(dm.train_set()) == 1  # good.png; notes.txt is not an image file
    assert _to_uint8(dm.init_images())[0, :, 0, 0].tolist() == [255, 0, 0]


def test_image_folder_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        ImageFolderDataModule(str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no \.jpg/\.jpeg/\.png image under"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")


def test_image_folder_worker_processes(tmp_path: Path) -> None:
    for i in range(6):
        _save(tmp_path / f"{i}.jpg", _solid(50, 70, (i * 40, 0, 0)))
    dm = ImageFolderDataModule(str(tmp_path), batch_size=4, num_workers=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["index"]) for b in batches] == [4, 2]
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(6))
    _check_batch(batches[0], 128, {"image", "index"})
