"""The dataset table: one record per dataset, and the DataModules and converter reading it."""

from __future__ import annotations

import pytest

from dti_sprites.datamodules import (
    CLEVR6DataModule,
    MultiDSpritesDataModule,
    ObjectsRoomDataModule,
    TetrominoesDataModule,
)
from dti_sprites.datamodules.catalog import BASE_URL, DATASETS, dataset_info, get_schema

# name: (image size, semantic classes incl. background, paper training split, default file)
EXPECTED = {
    "tetrominoes": ((35, 35), 20, 60_000, "tetrominoes.h5"),
    "multi_dsprites": ((64, 64), 4, 60_000, "multi_dsprites_colored_on_grayscale.h5"),
    "clevr6": ((128, 128), 7, 34_963, "clevr6.h5"),
    "clevr10": ((128, 128), 7, None, "clevr10.h5"),
    "objects_room": ((64, 64), 0, 60_000, "objects_room.h5"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_dataset_has_one_record(name: str) -> None:
    info = dataset_info(name)
    image_size, classes, train_size, file_name = EXPECTED[name]
    assert (info.image_size, info.num_semantic_classes, info.train_size) == (
        image_size,
        classes,
        train_size,
    )
    assert info.h5_name() == file_name
    assert list(DATASETS) == list(EXPECTED)


def test_protocols() -> None:
    clevr6, clevr10 = DATASETS["clevr6"].protocol, DATASETS["clevr10"].protocol
    assert (clevr6.first_n, clevr6.max_objects, clevr6.crop, clevr6.resize) == (
        70_000,
        6,
        (29, 221, 64, 256),
        (128, 128),
    )
    assert clevr10.max_objects is None and clevr10.crop == clevr6.crop
    for name in ("tetrominoes", "multi_dsprites", "objects_room"):
        assert DATASETS[name].protocol.describe(None) == "all records"


def test_source_files_follow_the_spec() -> None:
    assert get_schema("tetrominoes").source == "tetrominoes/tetrominoes_train.tfrecords"
    assert (
        get_schema("multi_dsprites").source
        == "multi_dsprites/multi_dsprites_colored_on_grayscale.tfrecords"
    )
    assert (
        get_schema("multi_dsprites", "binarized").url("http://mirror/data/")
        == "http://mirror/data/multi_dsprites/multi_dsprites_binarized.tfrecords"
    )
    assert (
        dataset_info("clevr6").schema().url()
        == dataset_info("clevr10").schema().url()
        == BASE_URL + "clevr_with_masks/clevr_with_masks_train.tfrecords"
    )
    assert get_schema("objects_room").source == "objects_room/objects_room_train.tfrecords"
    assert get_schema("objects_room", "six_objects").source.endswith(
        "objects_room_test_six_objects.tfrecords"
    )
    with pytest.raises(ValueError, match="unknown variant 'gray' for multi_dsprites"):
        get_schema("multi_dsprites", "gray")
    with pytest.raises(ValueError, match="unknown variant 'binarized' for tetrominoes"):
        get_schema("tetrominoes", "binarized")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        dataset_info("mnist")


def test_h5_names_carry_the_variant() -> None:
    md, room = dataset_info("multi_dsprites"), dataset_info("objects_room")
    assert md.h5_name("binarized") == "multi_dsprites_binarized.h5"
    assert room.h5_name("train") == "objects_room.h5"
    assert room.h5_name("six_objects") == "objects_room_six_objects.h5"
    with pytest.raises(ValueError, match="no variant"):
        dataset_info("tetrominoes").h5_name("binarized")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (TetrominoesDataModule, "tetrominoes"),
        (MultiDSpritesDataModule, "multi_dsprites"),
        (CLEVR6DataModule, "clevr6"),
        (ObjectsRoomDataModule, "objects_room"),
    ],
)
def test_datamodules_take_their_dataset_from_the_table(module: type, name: str) -> None:
    dm = module()
    image_size, classes, train_size, file_name = EXPECTED[name]
    assert dm.image_size == image_size and dm.num_semantic_classes == classes
    assert dm.train_size == train_size and str(dm.path) == f"data/{file_name}"
    assert dm.download_base_url == BASE_URL
    assert dm.has_semantic == (classes > 0)
    assert module(train_size=12).train_size == 12
