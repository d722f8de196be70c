"""DTI-Sprites: unsupervised layered image decomposition into object prototypes."""
