"""atomic_write: a reader finds the previous file or the whole new one, never half a file."""

import pytest

from dti_sprites.io import atomic_write, partial_path


def test_atomic_write_renames_the_whole_file_on_success(tmp_path):
    path = tmp_path / "new" / "table.csv"  # the folder does not exist yet
    for content in ("a,b\n1,2\n", "a,b\n3,4\n"):  # a new file, then a replacement
        with atomic_write(path) as tmp:
            assert tmp == partial_path(path) == tmp_path / "new" / "table.csv.partial"
            tmp.write_text(content[:4])
            with open(tmp, "a") as f:
                f.write(content[4:])
            assert not path.exists() or path.read_text() == "a,b\n1,2\n"  # not yet visible
        assert path.read_text() == content
        assert [p.name for p in path.parent.iterdir()] == ["table.csv"]


def test_atomic_write_keeps_the_previous_file_and_no_half_file_on_failure(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("previous\n")
    with pytest.raises(OSError, match="No space left"), atomic_write(path) as tmp:
        tmp.write_text("half a ta")
        raise OSError(28, "No space left on device")
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
