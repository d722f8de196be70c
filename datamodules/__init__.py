"""The DataModules and what they read at training time; the offline pipeline is ``pipeline``.

- ``base``          ``DTIDataModule``: the batch contract, loader arguments and loader factories
- ``catalog``       one record per dataset: source files, protocol, image size, classes, splits
- ``multi_object``  Tetrominoes, Multi-dSprites, CLEVR6, Objects Room: splits of one HDF5 file
- ``hdf5``          the HDF5 layout: validation of a file, ``MultiObjectHDF5Dataset`` reads it
- ``single_object`` the single-object family: its datasets and the base of its DataModules
- ``gtsrb``         GTSRB-8
- ``svhn``          SVHN
- ``horse``         Weizmann Horse
- ``image_folder``  folders of images (Instagram collections), optional masks and labels
- ``image_files``   image files -> uint8 tensors: finding, decoding, mask pairing, resizing
- ``resumable``     the training order (seeded per epoch, sharded), resumable mid-epoch
- ``pipeline``      TFRecord codec, decoding, generation, download, conversion, HDF5 writer, CLI

Experiment configs name the DataModules by their path in this package
(``class_path: dti_sprites.datamodules.TetrominoesDataModule``).
"""

from dti_sprites.datamodules.base import DTIDataModule
from dti_sprites.datamodules.gtsrb import GTSRB8DataModule
from dti_sprites.datamodules.horse import WeizmannHorseDataModule
from dti_sprites.datamodules.image_folder import ImageFolderDataModule
from dti_sprites.datamodules.multi_object import (
    CLEVR6DataModule,
    MultiDSpritesDataModule,
    MultiObjectDataModule,
    ObjectsRoomDataModule,
    TetrominoesDataModule,
)
from dti_sprites.datamodules.svhn import SVHNDataModule

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
