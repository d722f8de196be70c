"""Generated data: the pixel-exact Tetrominoes renderer and the schema of every generator."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from dti_sprites.datamodules.catalog import SCHEMAS, get_schema
from dti_sprites.datamodules.pipeline.decode import decode_example, entity_first_masks
from dti_sprites.datamodules.pipeline.synth import (
    TETROMINO_COLORS,
    TETROMINO_SHAPES,
    render_tetrominoes,
    synthesize,
    tetromino_cells,
    write_examples,
    write_synthetic,
)
from dti_sprites.datamodules.pipeline.tf_example import iter_examples
from dti_sprites.datamodules.pipeline.tfrecord import detect_compression

_REPO = Path(__file__).resolve().parents[3]
# 10 real DeepMind records, kept in the repository (tests/data/README.md) so that CI has them.
REAL = _REPO / "tests" / "data" / "tetrominoes_mini.tfrecords"

ALL_VARIANTS = sorted(SCHEMAS, key=str)


def _grid(cells: np.ndarray) -> frozenset[tuple[int, int]]:
    cells = cells - cells.min(axis=0)
    return frozenset(map(tuple, cells.tolist()))


def _rotations(rows: list[str]) -> set[frozenset[tuple[int, int]]]:
    grid = np.array([[ch == "#" for ch in row] for row in rows])
    return {_grid(np.argwhere(np.rot90(grid, k))) for k in range(4)}


def test_shape_table_is_the_19_fixed_tetrominoes() -> None:
    free = [["####"], ["##", "##"], [".#.", "###"], ["#..", "###"], ["..#", "###"]]
    free += [[".##", "##."], ["##.", ".##"]]  # I O T J L S Z
    fixed = set().union(*(_rotations(piece) for piece in free))
    table = {_grid(tetromino_cells(i)) for i in TETROMINO_SHAPES}
    assert sorted(TETROMINO_SHAPES) == list(range(1, 20))
    assert len(fixed) == 19 and table == fixed


def test_shape_ids_seen_in_real_data_follow_spec() -> None:
    spec = {
        2: "#/#/#/#",
        3: "###/#..",
        5: "..#/###",
        6: "###/..#",
        7: "##/.#/.#",
        9: "##/#./#.",
        10: "#./#./##",
        11: "##./.##",
        12: ".##/##.",
        13: ".#/##/#.",
        14: "#./##/.#",
        15: ".#./###",
        16: "###/.#.",
        17: ".#/##/.#",
        18: "#./##/#.",
        19: "##/##",
    }
    for shape_id, rows in spec.items():
        assert "/".join(TETROMINO_SHAPES[shape_id]) == rows
    # 1, 4, 8: the horizontal I, then a J orientation in the 3-wide (3-6) and the 2-wide (7-10)
    # L/J groups.
    assert TETROMINO_SHAPES[1] == ("####",)
    for group, (h, w) in ((range(3, 7), (2, 3)), (range(7, 11), (3, 2))):
        assert all(tetromino_cells(i).max(axis=0).tolist() == [h - 1, w - 1] for i in group)
    j_piece = _rotations(["#..", "###"])
    assert _grid(tetromino_cells(4)) in j_piece and _grid(tetromino_cells(8)) in j_piece


def test_renderer_reproduces_the_real_records_pixel_for_pixel() -> None:
    schema = get_schema("tetrominoes")
    for index, example in enumerate(iter_examples(REAL)):
        record = decode_example(schema, example, REAL, index)
        image, mask = render_tetrominoes(
            record["shape"][1:].astype(int), record["color"][1:], record["x"][1:], record["y"][1:]
        )
        np.testing.assert_array_equal(image, record["image"])
        np.testing.assert_array_equal(mask, record["mask"])


def test_renderer_block_intensities() -> None:
    image, mask = render_tetrominoes(np.array([19]), np.array([[1.0, 0.0, 1.0]]), [3], [4])
    block = image[3:8, 4:9]
    np.testing.assert_array_equal(block[0, :, 0], [191, 255, 255, 255, 223])
    np.testing.assert_array_equal(block[2, :, 2], [127, 159, 159, 159, 191])
    np.testing.assert_array_equal(block[4, :, 0], [95, 63, 63, 63, 127])
    assert not block[..., 1].any()  # green is off
    np.testing.assert_array_equal(image[3:13, 4:14, 0], np.tile(block[..., 0], (2, 2)))
    assert mask.shape == (2, 35, 35, 1) and (mask[1, 3:13, 4:14] == 255).all()
    assert int((mask[1] == 255).sum()) == 100


def test_renderer_rejects_overlap_and_leaving_the_canvas() -> None:
    red = TETROMINO_COLORS[:1]
    with pytest.raises(ValueError, match="overlaps"):
        render_tetrominoes(np.array([19, 19]), np.repeat(red, 2, 0), [0, 5], [0, 5])
    with pytest.raises(ValueError, match="leaves"):
        render_tetrominoes(np.array([1]), red, [0], [20])  # 20 px wide at column 20


def test_synthetic_tetrominoes_follow_the_recipe() -> None:
    records = list(synthesize("tetrominoes", 300, seed=3))
    shapes = np.stack([r["shape"] for r in records])
    assert set(np.unique(shapes[:, 1:])) == set(range(1, 20))
    for record in records:
        on = record["mask"][..., 0] == 255  # (4, 35, 35)
        np.testing.assert_array_equal(on.sum(axis=0), 1)  # never overlapping
        np.testing.assert_array_equal(on.sum(axis=(1, 2))[1:], 100)
        assert ((record["image"].max(axis=-1) > 0) == ~on[0]).all()  # black background
        colors = {tuple(c) for c in record["color"][1:]}
        assert colors <= {tuple(c) for c in TETROMINO_COLORS}
        for k in range(1, 4):
            rows, cols = np.nonzero(on[k])
            assert (rows.min(), cols.min()) == (record["x"][k], record["y"][k])
        image, _ = render_tetrominoes(
            record["shape"][1:].astype(int), record["color"][1:], record["x"][1:], record["y"][1:]
        )
        np.testing.assert_array_equal(image, record["image"])


def test_synthesize_is_deterministic() -> None:
    for dataset, variant in (("tetrominoes", None), ("multi_dsprites", "colored_on_colored")):
        a = list(synthesize(dataset, 3, seed=7, variant=variant))
        b = list(synthesize(dataset, 3, seed=7, variant=variant))
        c = list(synthesize(dataset, 3, seed=8, variant=variant))
        assert all((x["image"] == y["image"]).all() for x, y in zip(a, b, strict=True))
        assert any((x["image"] != z["image"]).any() for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize(("dataset", "variant"), ALL_VARIANTS)
def test_synthetic_records_match_their_schema(dataset: str, variant: str | None) -> None:
    schema = get_schema(dataset, variant)
    n = 3 if dataset == "clevr_with_masks" else 10
    for record in synthesize(dataset, n, seed=0, variant=variant):
        assert list(record) == [spec.name for spec in schema.features]
        for spec in schema.features:
            assert record[spec.name].shape == spec.shape, spec.name
            assert record[spec.name].dtype == spec.dtype, spec.name
        masks = entity_first_masks(schema, record["mask"])  # (E, H, W)
        assert set(np.unique(masks)) <= {0, 255}
        np.testing.assert_array_equal((masks == 255).sum(axis=0), 1)
        assert masks[0].any()  # the background is somewhere


@pytest.mark.parametrize(("dataset", "variant"), ALL_VARIANTS)
def test_written_synthetic_files_decode_identically(
    tmp_path: Path, dataset: str, variant: str | None
) -> None:
    n = 2 if dataset == "clevr_with_masks" else 5
    path = write_synthetic(dataset, tmp_path / "synth.tfrecords", n, seed=1, variant=variant)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # whole-file GZIP
    assert not list(tmp_path.glob("*.partial"))
    schema = get_schema(dataset, variant)
    expected = list(synthesize(dataset, n, seed=1, variant=variant))
    for index, (example, record) in enumerate(zip(iter_examples(path), expected, strict=True)):
        decoded = decode_example(schema, example, path, index)
        for name, value in record.items():
            np.testing.assert_array_equal(decoded[name], value)


@pytest.mark.parametrize(
    ("variant", "low", "high", "channels"),
    [("colored_on_grayscale", 2, 5, 3), ("colored_on_colored", 1, 4, 3), ("binarized", 2, 3, 1)],
)
def test_multi_dsprites_pixels_carry_their_sprite_colour(
    variant: str, low: int, high: int, channels: int
) -> None:
    schema = get_schema("multi_dsprites", variant)
    counts = set()
    for record in synthesize("multi_dsprites", 40, seed=2, variant=variant):
        count = int(record["visibility"][1:].sum())
        counts.add(count)
        assert set(np.unique(record["shape"][1 : count + 1])) <= {1, 2, 3}
        assert not record["shape"][count + 1 :].any()  # null slots are zero
        label = entity_first_masks(schema, record["mask"]).argmax(axis=0)  # (H, W)
        palette = np.round(255 * record["color"]).astype(np.uint8)  # (E, C)
        np.testing.assert_array_equal(record["image"], palette[label])
        if variant == "colored_on_grayscale":
            assert np.ptp(record["color"][0]) == 0  # grey background
        if variant == "binarized":
            assert set(np.unique(record["image"])) <= {0, 255}
    assert counts == set(range(low, high + 1))
    assert schema.channels == channels


def test_clevr_scenes_exercise_the_clevr6_protocol() -> None:
    counts, outside, codes = [], 0, set()
    for record in synthesize("clevr6", 40, seed=5):
        visible = record["visibility"].astype(bool)
        counts.append(int(visible[1:].sum()))
        columns = record["pixel_coords"][visible, 0][1:]
        outside += int(((columns < 64) | (columns >= 256)).sum())
        codes |= set(record["shape"][visible][1:].tolist())
        assert not record["shape"][~visible].any()  # 0 = null
        label = record["mask"][..., 0].argmax(axis=0)
        assert set(np.unique(label)) <= set(np.flatnonzero(visible).tolist())
    assert min(counts) == 3 and max(counts) == 10
    assert any(c <= 6 for c in counts) and any(c > 6 for c in counts)
    assert outside > 0 and codes == {1, 2, 3}


@pytest.mark.parametrize(
    ("variant", "high", "entities"),
    [("train", 3, 7), ("six_objects", 6, 10), ("empty_room", 0, 4), ("identical_color", 6, 10)],
)
def test_objects_room_entities(variant: str, high: int, entities: int) -> None:
    assert get_schema("objects_room", variant).num_entities == entities
    for record in synthesize("objects_room", 15, seed=4, variant=variant):
        present = (record["mask"][..., 0] == 255).any(axis=(1, 2))  # (E,)
        assert present[:4].sum() >= 3  # sky, floor and at least one wall half
        assert present[4:].sum() <= high
        objects = record["mask"][4:, ..., 0] == 255
        if variant == "identical_color" and objects.any():
            colours = record["image"][objects.any(axis=0)]
            assert len(np.unique(colours, axis=0)) == 1


def test_real_records_survive_our_writer(tmp_path: Path) -> None:
    originals = list(iter_examples(REAL))
    copy = tmp_path / "copy.tfrecords"
    assert write_examples(copy, originals) == len(originals)
    assert detect_compression(copy.read_bytes()[:16]) == "gzip"
    assert gzip.decompress(copy.read_bytes()) == gzip.decompress(REAL.read_bytes())
    assert not list(tmp_path.glob("*.partial"))
    for original, again in zip(originals, iter_examples(copy), strict=True):
        assert list(again) == list(original)
        for name in original:
            np.testing.assert_array_equal(again[name], original[name])
