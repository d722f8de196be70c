"""DTI-Sprites: unsupervised layered image decomposition into object prototypes.

The method is plain PyTorch (``DTISprites`` and its parts); ``DTISpritesModule`` trains it
with Lightning.
"""

from dti_sprites.model import Decomposition, DTISprites

__all__ = ["DTISprites", "Decomposition"]
