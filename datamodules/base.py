"""What every DataModule of this project provides to the LightningModule.

Batches are dicts of tensors (collated by the default collate function):

- ``image``    (B, 3, H, W) float32 in [0, 1]; always
- ``mask``     (B, H, W) int64 label map, 0 = background, e = entity e (multi-object data;
               Weizmann Horse: 0 = background, 1 = horse)
- ``semantic`` (B, H, W) int64 class map, 0 = background (multi-object data)
- ``label``    (B,) int64 class label (labelled single-object data)
- ``index``    (B,) int64 position of the sample in its split; always

A key is present only when the dataset has that ground truth.
"""

from __future__ import annotations

import lightning as L
import torch


class DTIDataModule(L.LightningDataModule):
    """Base class: plain attributes the model and the evaluation read.

    Attributes:
        image_size: (H, W) of the images this DataModule yields.
        eval_protocols: names of the validation / test dataloaders, in order
            (e.g. ``("paper320", "heldout")``); metric keys carry these names.
        num_semantic_classes: classes of ``semantic`` including background (0 when absent).
        num_classes: classes of ``label`` (0 when absent).
    """

    image_size: tuple[int, int] = (0, 0)
    eval_protocols: tuple[str, ...] = ("val",)
    num_semantic_classes: int = 0
    num_classes: int = 0

    def check_source(self, stage: str) -> None:
        """Raise :class:`~dti_sprites.io.DataSourceError` now when the data that ``stage``
        reads is missing or invalid and ``prepare_data`` will not create it.

        The command line calls it before the trainer or the logger start anything, so that a
        missing or broken file costs one line of output and no run. Default: no check.
        """

    def init_images(self, n: int = 100) -> torch.Tensor:
        """The first ``n`` training images, (n, 3, H, W) float32 in [0, 1].

        Deterministic (same on every DDP rank); used for data-dependent initialisation such as
        the mean background. Called after ``setup("fit")``.
        """
        raise NotImplementedError
