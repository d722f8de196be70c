"""The DataModules and the dataset table; the offline pipeline (TFRecord -> HDF5): ``pipeline``."""

from dti_sprites.datamodules.base import DTIDataModule
from dti_sprites.datamodules.images import (
    GTSRB8DataModule,
    ImageFolderDataModule,
    SVHNDataModule,
    WeizmannHorseDataModule,
)
from dti_sprites.datamodules.multi_object import (
    CLEVR6DataModule,
    MultiDSpritesDataModule,
    MultiObjectDataModule,
    ObjectsRoomDataModule,
    TetrominoesDataModule,
)

__all__ = [
    "CLEVR6DataModule",
    "DTIDataModule",
    "GTSRB8DataModule",
    "ImageFolderDataModule",
    "MultiDSpritesDataModule",
    "MultiObjectDataModule",
    "ObjectsRoomDataModule",
    "SVHNDataModule",
    "TetrominoesDataModule",
    "WeizmannHorseDataModule",
]
