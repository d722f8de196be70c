"""DataModules, the TensorFlow-free TFRecord reader and the dataset converter."""

from dti_sprites.datamodules.base import DTIDataModule

__all__ = ["DTIDataModule"]
