"""HDF5-backed DataModules for the multi-object benchmarks (docs/method.md §7, §8).

One HDF5 file per dataset, written by ``dti-sprites-data convert`` (root keys ``image``
(N, H, W, 3) uint8, ``mask`` (N, H, W) uint8 label map, ``semantic`` (N, H, W) uint8, attribute
``dataset``). Batches follow :mod:`dti_sprites.datamodules.base` once they reach the model:
``image`` (B, 3, H, W) float32 in [0, 1], ``mask`` and ``semantic`` (B, H, W) int64, ``index``
(B,) int64 (position in the split). They travel through the DataLoader as uint8 (4× less to copy
and pin) and become float / int64 in :meth:`MultiObjectDataModule.on_after_batch_transfer`, on
the training device. Code that iterates a dataloader outside a Trainer calls that hook itself.

Splits (record indices of the file, N records, ``T = train_size``, ``H = heldout_size``):

- ``train``    records ``[0, T)``: the paper protocol (first 60,000; CLEVR6: the 34,963 scenes
               of the first 70,000 records with at most 6 objects).
- ``paper320`` records ``[0, paper_eval_size)``: inside the training set, as in the paper.
- ``heldout``  up to ``H`` records right after the training range, ``[T, min(N, T + H))``;
               with ``heldout_offset = O``, ``[T + O, min(N, T + O + H))``: a validation
               range ``O = 0`` to choose settings on and a test range ``O = H`` after it that
               no choice has seen (``benchmarks/convergence.py --test``).

The paper protocol wins whenever the file can hold it (``N >= T``): training is exactly the
first ``T`` records and ``heldout`` is whatever follows, possibly nothing; the standard CLEVR6
file holds exactly 34,963 scenes, so it has no held-out split unless converted with more source
records (``dti-sprites-data convert --dataset clevr6 --limit 100000`` appends the filtered scenes
of records 70,000+, the region Slot Attention evaluates on). When the file is smaller than the
training range (``N < T``, e.g. generated data), the held-out split is taken from its end,
``h = min(H, N // 5)`` records, and training keeps the first ``N - h``, so they never overlap.
Either deviation is reported by one warning. An empty held-out split (or ``heldout_size=0``)
drops the ``heldout`` protocol. Validation and test dataloaders are ``[paper320, heldout]``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from dti_sprites.datamodules.base import DTIDataModule, Sample
from dti_sprites.datamodules.catalog import BASE_URL, dataset_info
from dti_sprites.datamodules.hdf5 import MultiObjectHDF5Dataset, check_file, read_attr
from dti_sprites.datamodules.resumable import ResumableDataLoader
from dti_sprites.io import MissingDataError

__all__ = [
    "CLEVR6DataModule",
    "MultiDSpritesDataModule",
    "MultiObjectDataModule",
    "ObjectsRoomDataModule",
    "Splits",
    "TetrominoesDataModule",
    "plan_splits",
]

PredictSplit = Literal["paper320", "heldout", "train"]
MultiDSpritesVariant = Literal["colored_on_grayscale", "colored_on_colored", "binarized"]


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Record ranges of the file: ``train`` and ``heldout`` never overlap, ``paper320`` ⊂ train."""

    train: range
    paper320: range
    heldout: range
    shrunk: bool  # the training split is smaller than requested (file too small)


def plan_splits(
    n_records: int,
    train_size: int,
    paper_eval_size: int,
    heldout_size: int,
    heldout_offset: int = 0,
) -> Splits:
    """The split rule of the module docstring, for a file of ``n_records`` records."""
    if min(train_size, paper_eval_size, heldout_size, heldout_offset) < 0 or train_size == 0:
        raise ValueError(
            f"train_size must be > 0 and paper_eval_size, heldout_size, heldout_offset >= 0 "
            f"(got {train_size}, {paper_eval_size}, {heldout_size}, {heldout_offset})"
        )
    if n_records >= train_size:
        train = range(train_size)
        start = min(n_records, train_size + heldout_offset)
        heldout = range(start, min(n_records, start + heldout_size))
    elif heldout_offset:
        raise ValueError(
            f"heldout_offset={heldout_offset} needs a file that holds the training range: it "
            f"has {n_records} records for train_size={train_size}"
        )
    else:
        n_heldout = min(heldout_size, n_records // 5)
        train = range(n_records - n_heldout)
        heldout = range(n_records - n_heldout, n_records)
    paper = range(min(paper_eval_size, len(train)))
    return Splits(train, paper, heldout, shrunk=len(train) < train_size)


# --------------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------------


class MultiObjectDataModule(DTIDataModule):
    """Shared logic of the multi-object DataModules; a subclass names its dataset.

    Everything about the dataset (image size, semantic classes, paper training split, file name,
    source file) comes from its record in ``catalog.DATASETS``; the number of semantic classes
    from the file's ``num_semantic_classes`` attribute when the file has one (the converter
    writes it), checked again at ``setup`` for a file created after construction.

    Args:
        path: the HDF5 file (default: ``data/<name>.h5``, e.g. ``data/tetrominoes.h5``,
            ``data/multi_dsprites_<variant>.h5``, ``data/clevr6.h5``).
        batch_size: per process (under DDP the global batch is ``batch_size × world size``).
        num_workers: DataLoader worker processes (persistent when > 0).
        train_size: records ``[0, train_size)`` are the training split (default: the
            paper's, 60,000; CLEVR6 34,963).
        paper_eval_size: records ``[0, paper_eval_size)`` are the ``paper320`` protocol.
        heldout_size: up to this many records after the training range are ``heldout``.
        heldout_offset: the ``heldout`` records start this many records after the training
            range (0: right after it; ``heldout_size``: the test range after a validation
            range of that size).
        in_memory: read each split into uint8 numpy arrays at ``setup``.
        download: in ``prepare_data``, when ``path`` is missing, fetch the public TFRecord
            next to it and convert it (``download_base_url`` + the ``source`` path of its
            ``catalog`` schema).
        generate: in ``prepare_data``, when ``path`` is missing and this is > 0, write that
            many synthetic records (``pipeline.synth.write_synthetic``) and convert them (CLEVR6
            keeps the scenes that pass its filter, so fewer). Exclusive with ``download``.
        seed: seed of the synthetic data.
        predict_split: what ``predict_dataloader`` iterates.
        download_base_url: where ``download`` fetches from (a mirror).
        shuffle_seed: seed of the training order (epoch ``e``: a permutation drawn from
            ``shuffle_seed + e``); None: the run's ``seed_everything`` seed.
    """

    dataset_name: ClassVar[str]  # key of ``catalog.DATASETS``, attribute ``dataset`` of the file
    variant: str | None = None  # the default variant; MultiDSpritesDataModule sets it

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        train_size: int | None = None,
        paper_eval_size: int = 320,
        heldout_size: int = 2000,
        heldout_offset: int = 0,
        in_memory: bool = False,
        download: bool = False,
        generate: int = 0,
        seed: int = 0,
        predict_split: PredictSplit = "paper320",
        download_base_url: str = BASE_URL,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)  # checks batch_size, num_workers
        info = dataset_info(self.dataset_name)
        schema = info.schema(self.variant)  # checks the variant
        train_size = info.train_size if train_size is None else train_size
        if train_size is None:
            raise ValueError(f"{info.name} has no paper training split: pass train_size")
        if download and generate > 0:
            raise ValueError("download=True and generate > 0 both create the file: choose one")
        if predict_split not in ("paper320", "heldout", "train"):
            raise ValueError(
                f"predict_split={predict_split!r}, expected 'paper320', 'heldout' or 'train'"
            )
        if generate < 0:
            raise ValueError(f"generate must be >= 0, got {generate}")
        plan_splits(train_size, train_size, paper_eval_size, heldout_size, heldout_offset)  # checks
        self.path = Path("data") / info.h5_name(self.variant) if path is None else Path(path)
        self.train_size = train_size
        self.paper_eval_size = paper_eval_size
        self.heldout_size = heldout_size
        self.heldout_offset = heldout_offset
        self.in_memory = in_memory
        self.download = download
        self.generate = generate
        self.seed = seed
        self.predict_split: PredictSplit = predict_split
        self.download_base_url = download_base_url
        self.image_channels = (1, 3) if schema.channels == 1 else (3,)  # grey: made RGB
        self.image_size = info.image_size
        self.has_semantic = info.num_semantic_classes > 0
        self.num_semantic_classes = _file_classes(self.path, info.num_semantic_classes)
        self.eval_protocols = ("paper320", "heldout") if heldout_size > 0 else ("paper320",)
        self.splits: Splits | None = None
        self._datasets: dict[str, MultiObjectHDF5Dataset] = {}
        self._warned = False
        self.save_hyperparameters()

    # -- creating the file (rank 0) ------------------------------------------------------------

    def prepare_data(self) -> None:
        """Create ``path`` when it is missing and ``download`` or ``generate`` asks for it."""
        if self.path.exists():
            return
        if self.download:
            from dti_sprites.datamodules.pipeline.convert import convert
            from dti_sprites.datamodules.pipeline.download import download

            tfrecord = download(
                self.dataset_name,
                self.path.parent,
                self.variant,
                base_url=self.download_base_url,
                convert_after=False,
            )
            convert(self.dataset_name, tfrecord, self.path, variant=self.variant)
        elif self.generate > 0:
            from dti_sprites.datamodules.pipeline.convert import convert
            from dti_sprites.datamodules.pipeline.synth import write_synthetic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".synth-") as tmp:
                tfrecord = write_synthetic(
                    self.dataset_name,
                    Path(tmp) / "synthetic.tfrecords",
                    n=self.generate,
                    seed=self.seed,
                    variant=self.variant,
                )
                convert(
                    self.dataset_name, tfrecord, self.path, variant=self.variant, progress=False
                )

    def _create_hint(self) -> str:
        variant = f" --variant {self.variant}" if self.variant else ""
        name = self.dataset_name
        default = self.path.parent / dataset_info(name).h5_name(self.variant)
        moved = "" if default == self.path else f" (writes {default}; move it to {self.path})"
        return (
            f"Create it with `dti-sprites-data download --dataset {name}{variant} --root "
            f"{self.path.parent}`{moved}, or from a local TFRecord with `dti-sprites-data convert "
            f"--dataset {name}{variant} --src FILE.tfrecords --out {self.path}`; or set "
            "download=True (or generate=N for synthetic data) on this DataModule."
        )

    def check_source(self, stage: str) -> None:
        """Check the file now (see :meth:`DTIDataModule.check_source`), unless ``download`` or
        ``generate`` will create it."""
        if self.path.exists() or not (self.download or self.generate):
            self.setup(stage)

    # -- splits and datasets -------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Validate the file (once) and plan the splits; raises before training starts."""
        if self.splits is None:
            if not self.path.is_file():
                raise MissingDataError(f"{self.path} not found. {self._create_hint()}")
            self._check_semantic_attr()
            n = check_file(
                self.path,
                self._keys(),
                (),
                self.image_size,
                self.image_channels,
                self.dataset_name,
                self.variant,
                self.num_semantic_classes,
            )["image"][0]
            self.splits = plan_splits(
                n, self.train_size, self.paper_eval_size, self.heldout_size, self.heldout_offset
            )
            if len(self.splits.heldout) == 0:
                self.eval_protocols = ("paper320",)
            if not self._warned:
                self._warned = True
                self._warn_deviation(n)

    def _warn_deviation(self, n: int) -> None:
        """One warning when the splits differ from what the arguments asked for."""
        assert self.splits is not None
        train, paper, heldout = self.splits.train, self.splits.paper320, self.splits.heldout
        if self.splits.shrunk:
            rank_zero_warn(
                f"{self.path} holds {n} records, fewer than train_size={self.train_size}: "
                f"training on records [0, {len(train)}), held-out = the last {len(heldout)}, "
                f"paper320 = [0, {len(paper)})"
            )
        elif self.heldout_size > 0 and len(heldout) == 0:
            rank_zero_warn(
                f"{self.path} holds {n} records, no more than train_size={self.train_size}: "
                "no held-out split (convert more source records to get one); evaluating on "
                "paper320 only"
            )

    def _check_semantic_attr(self) -> None:
        """Take the file's class count when it differs (a file created after construction)."""
        found = _file_classes(self.path, self.num_semantic_classes)
        if found != self.num_semantic_classes:
            rank_zero_warn(
                f"{self.path}: attribute 'num_semantic_classes' is {found}; using it instead of "
                f"{self.num_semantic_classes}"
            )
            self.num_semantic_classes = found

    def _keys(self) -> tuple[str, ...]:
        return ("mask", "semantic") if self.has_semantic else ("mask",)

    def dataset(self, split: PredictSplit) -> MultiObjectHDF5Dataset:
        """The dataset of one split (after ``setup``); in-memory splits share arrays."""
        if self.splits is None:
            raise RuntimeError("call setup() first")
        if split not in self._datasets:
            rng: range = getattr(self.splits, split)
            train = self._datasets.get("train")
            if split == "paper320" and train is not None:
                self._datasets[split] = train.view(rng.start, rng.stop)
            else:
                self._datasets[split] = MultiObjectHDF5Dataset(
                    self.path, rng.start, rng.stop, self._keys(), self.in_memory
                )
        return self._datasets[split]

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training records (uint8 until ``on_after_batch_transfer``), this process's
        shard, resumable mid-epoch (:mod:`dti_sprites.datamodules.resumable`)."""
        return self._train_loader(self.dataset("train"))

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per name in ``eval_protocols``: ``[paper320, heldout]``."""
        datasets = [self.dataset(name) for name in self.eval_protocols]  # type: ignore[arg-type]
        return [self._eval_loader(dataset) for dataset in datasets]

    def test_dataloader(self) -> list[DataLoader]:
        """Same as validation: ``[paper320, heldout]``."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_split`` records in order."""
        return self._eval_loader(self.dataset(self.predict_split))

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        """uint8 batch -> base.py contract: image (B, 3, H, W) float32 in [0, 1], maps int64."""
        batch = dict(batch)
        image = batch["image"]  # (B, C, H, W)
        if image.dtype == torch.uint8:
            image = image.float().div_(255)
        if image.shape[1] == 1:  # binarized Multi-dSprites: grey -> RGB
            image = image.repeat(1, 3, 1, 1)  # (B, 3, H, W)
        batch["image"] = image
        for key in ("mask", "semantic"):
            if key in batch:
                batch[key] = batch[key].long()  # (B, H, W)
        return batch

    def init_images(self, n: int = 100) -> Tensor:
        """The first ``n`` training images, (n, 3, H, W) float32 in [0, 1] (after ``setup``)."""
        train = self.dataset("train")
        batch = train.__getitems__(list(range(min(n, len(train)))))
        images = torch.stack([s["image"] for s in batch])  # (n, C, H, W) uint8
        return self.on_after_batch_transfer({"image": images}, 0)["image"]

    def teardown(self, stage: str) -> None:
        for ds in self._datasets.values():
            ds.close()


def _file_classes(path: Path, default: int) -> int:
    """The file's ``num_semantic_classes`` attribute if it is readable, else ``default``."""
    value = read_attr(path, "num_semantic_classes")
    return default if value is None else int(value)


class TetrominoesDataModule(MultiObjectDataModule):
    """Tetrominoes (35×35, 19 shapes + background = 20 semantic classes)."""

    dataset_name = "tetrominoes"


class MultiDSpritesDataModule(MultiObjectDataModule):
    """Multi-dSprites (64×64, square / ellipse / heart + background = 4 semantic classes).

    ``path`` defaults to ``data/multi_dsprites_<variant>.h5``. The binarized variant's grey
    images are repeated to 3 channels.

    Args:
        path: as ``MultiObjectDataModule``.
        variant: which of the three Multi-dSprites datasets.
        **kwargs: the other arguments of ``MultiObjectDataModule`` (batch_size, ...).
    """

    dataset_name = "multi_dsprites"

    def __init__(
        self,
        path: str | None = None,
        variant: MultiDSpritesVariant = "colored_on_grayscale",
        **kwargs: Any,
    ) -> None:
        self.variant = variant  # read by MultiObjectDataModule.__init__
        super().__init__(path, **kwargs)


class CLEVR6DataModule(MultiObjectDataModule):
    """CLEVR6 (128×128 after the docs/method.md §8 crop and resize; ≤ 6 objects).

    Semantic classes: background + shape × material (cube, sphere, cylinder × rubber, metal) =
    7, as the converter writes ``semantic`` (``pipeline.decode.entity_classes``) and as the
    authors count.
    """

    dataset_name = "clevr6"


class ObjectsRoomDataModule(MultiObjectDataModule):
    """Objects Room (64×64; instance masks only, no semantic classes)."""

    dataset_name = "objects_room"
