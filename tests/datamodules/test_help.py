"""Every DataModule's options, its own and those it forwards to its base class, in --help."""

from __future__ import annotations

import inspect

import pytest

from dti_sprites import datamodules
from dti_sprites.cli import main

CLASSES = [getattr(datamodules, name) for name in datamodules.__all__ if name.endswith("Module")]
CLASSES = [cls for cls in CLASSES if cls.__init__ is not datamodules.DTIDataModule.__init__]


def _options(cls: type) -> list[str]:
    """Parameters of ``cls`` and of every base whose ``__init__`` it forwards ``**kwargs`` to."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is datamodules.DTIDataModule:
            continue
        parameters = inspect.signature(klass.__init__).parameters
        names += [n for n in parameters if n not in ("self", "kwargs") and n not in names]
        if "kwargs" not in parameters:
            break
    return names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_help_documents_every_option(cls: type, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data.help", cls.__name__])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    options = _options(cls)
    for name in options:
        assert f"  --data.{name} " in out, name
    text = " ".join(out.split())  # help lines are wrapped at any space
    assert text.count("(type: ") + text.count("(required, type: ") == len(options)


def test_forwarded_options_are_counted() -> None:
    """The subclasses that forward do reach their base's options (the test above is not empty)."""
    assert len(CLASSES) == 9
    assert _options(datamodules.TetrominoesDataModule)[:3] == ["path", "batch_size", "num_workers"]
    assert len(_options(datamodules.MultiDSpritesDataModule)) == 15
    assert _options(datamodules.WeizmannHorseDataModule)[-4:] == [
        "batch_size",
        "num_workers",
        "eval_protocols",
        "shuffle_seed",
    ]
