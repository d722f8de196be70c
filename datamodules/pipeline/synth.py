"""Generated data in the exact DeepMind encoding (docs/method.md §8): tests, demos, benchmarks.

- Tetrominoes: pixel-faithful (``render_tetrominoes`` reproduces the real records exactly).
- Multi-dSprites (all three variants): procedural squares, ellipses and hearts with dSprites
  latents, HSV / RGB colours, painted in order with occlusion, entity-last masks.
- CLEVR with masks: schema-faithful 240×320 scenes of 3–10 flat-shaded cubes, spheres and
  cylinders, some outside the CLEVR6 crop, with 1-byte codes for size / material / shape /
  colour (codes below; 0 = null).
- Objects Room (all four variants): sky, floor and two wall halves plus simple objects.

Every generator yields feature dicts with the dtypes and shapes that ``decode.decode_example``
gives for real records; ``write_synthetic`` writes them with ``TFRecordWriter`` as a whole-file
GZIP TFRecord, as DeepMind's files are.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from dti_sprites.datamodules.catalog import Schema, get_schema
from dti_sprites.datamodules.pipeline.tf_example import FeatureValue, encode_example
from dti_sprites.datamodules.pipeline.tfrecord import frame_record
from dti_sprites.io import atomic_write

__all__ = [
    "BLOCK_INTENSITY",
    "CLEVR_COLORS",
    "CLEVR_MATERIALS",
    "CLEVR_SHAPES",
    "CLEVR_SIZES",
    "DSPRITES_SHAPES",
    "TETROMINO_COLORS",
    "TETROMINO_SHAPES",
    "TFRecordWriter",
    "render_tetrominoes",
    "synthesize",
    "tetromino_cells",
    "write_examples",
    "write_synthetic",
]

Record = dict[str, np.ndarray]

# --------------------------------------------------------------------------------------------
# Tetrominoes
# --------------------------------------------------------------------------------------------

# The dataset's shape ids. 2, 3, 5-7, 9-19 are seen in the real records; the three missing ones
# follow the dataset's grouping: 1-2 I, 3-6 the 3-wide L/J, 7-10 the 2-wide L/J, 11-14 S/Z,
# 15-18 T, 19 O. So 1 is the horizontal I, 4 the 3-wide J `#../###` and 8 the 2-wide J
# `.#/.#/##`.
TETROMINO_SHAPES: dict[int, tuple[str, ...]] = {
    1: ("####",),
    2: ("#", "#", "#", "#"),
    3: ("###", "#.."),
    4: ("#..", "###"),
    5: ("..#", "###"),
    6: ("###", "..#"),
    7: ("##", ".#", ".#"),
    8: (".#", ".#", "##"),
    9: ("##", "#.", "#."),
    10: ("#.", "#.", "##"),
    11: ("##.", ".##"),
    12: (".##", "##."),
    13: (".#", "##", "#."),
    14: ("#.", "##", ".#"),
    15: (".#.", "###"),
    16: ("###", ".#."),
    17: (".#", "##", ".#"),
    18: ("#.", "##", "#."),
    19: ("##", "##"),
}

# Red, green, blue, yellow, magenta, cyan.
TETROMINO_COLORS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32
)

# Intensity of each pixel of a 5×5 block; pixel = floor(255 · v · colour).
BLOCK_INTENSITY = np.array(
    [[0.75, 1.0, 1.0, 1.0, 0.875]]
    + [[0.5, 0.625, 0.625, 0.625, 0.75]] * 3
    + [[0.375, 0.25, 0.25, 0.25, 0.5]]
)
_BLOCK = 5
_TETROMINO_SIZE = 35


def tetromino_cells(shape_id: int) -> np.ndarray:
    """(4, 2) int (row, column) of the blocks of shape ``shape_id`` (1..19), in block units."""
    rows = TETROMINO_SHAPES[shape_id]
    return np.array([(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "#"])


def _footprint(shape_id: int) -> np.ndarray:
    """(5·rows, 5·cols) bool pixels covered by a shape at its bounding-box origin."""
    grid = np.array([[ch == "#" for ch in row] for row in TETROMINO_SHAPES[shape_id]])
    return np.kron(grid, np.ones((_BLOCK, _BLOCK), dtype=bool))


_FOOTPRINTS = {shape_id: _footprint(shape_id) for shape_id in TETROMINO_SHAPES}


def render_tetrominoes(
    shapes: np.ndarray,
    colors: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    size: int = _TETROMINO_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Render pieces exactly as DeepMind's Tetrominoes (docs/method.md §8).

    Args:
        shapes: (P,) shape ids 1..19.
        colors: (P, 3) RGB in [0, 1].
        x: (P,) row of each piece's bounding-box top-left, in pixels.
        y: (P,) column of the bounding-box top-left, in pixels.
        size: canvas side.

    Returns:
        image (size, size, 3) uint8 on a black background, and masks (P+1, size, size, 1) uint8
        0/255, entity 0 the background, entity p+1 piece p.

    Raises:
        ValueError: a piece leaves the canvas or overlaps another one.
    """
    image = np.zeros((size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.int64)
    for p, (shape_id, color, row, col) in enumerate(zip(shapes, colors, x, y, strict=True)):
        footprint = _FOOTPRINTS[int(shape_id)]
        top, left = int(row), int(col)
        bottom, right = top + footprint.shape[0], left + footprint.shape[1]
        if top < 0 or left < 0 or bottom > size or right > size:
            raise ValueError(f"piece {p} (shape {shape_id}) leaves the {size}×{size} canvas")
        window = (slice(top, bottom), slice(left, right))
        if (label[window][footprint] != 0).any():
            raise ValueError(f"piece {p} (shape {shape_id}) overlaps another piece")
        block = np.floor(255.0 * BLOCK_INTENSITY[..., None] * np.asarray(color, np.float64))
        pixels = np.tile(block, (footprint.shape[0] // _BLOCK, footprint.shape[1] // _BLOCK, 1))
        label[window][footprint] = p + 1
        image[window][footprint] = pixels[footprint].astype(np.uint8)  # (100, 3)
    masks = _one_hot_masks(label, len(shapes) + 1)[..., None]  # (P+1, size, size, 1)
    return image, masks


def _one_hot_masks(label: np.ndarray, entities: int) -> np.ndarray:
    """(E, H, W) uint8 0/255 masks from an (H, W) label map."""
    return (label[None] == np.arange(entities)[:, None, None]).astype(np.uint8) * 255


def _tetrominoes(schema: Schema, rng: np.random.Generator) -> Record:
    pieces = schema.num_entities - 1
    shapes = rng.integers(1, 20, size=pieces)
    colors = TETROMINO_COLORS[rng.integers(0, len(TETROMINO_COLORS), size=pieces)]
    footprints = [_FOOTPRINTS[int(s)] for s in shapes]
    while True:  # uniform over the placements inside the canvas where no two pieces overlap
        x = np.array([rng.integers(0, _TETROMINO_SIZE - f.shape[0] + 1) for f in footprints])
        y = np.array([rng.integers(0, _TETROMINO_SIZE - f.shape[1] + 1) for f in footprints])
        cover = np.zeros((_TETROMINO_SIZE, _TETROMINO_SIZE), dtype=np.int64)
        for f, row, col in zip(footprints, x, y, strict=True):
            cover[row : row + f.shape[0], col : col + f.shape[1]] += f
        if cover.max() <= 1:
            break
    image, mask = render_tetrominoes(shapes, colors, x, y)
    zero = np.zeros(1, dtype=np.float32)
    return {
        "image": image,
        "mask": mask,
        "x": np.concatenate([zero, x]).astype(np.float32),
        "y": np.concatenate([zero, y]).astype(np.float32),
        "shape": np.concatenate([zero, shapes]).astype(np.float32),
        "color": np.concatenate([np.zeros((1, 3)), colors]).astype(np.float32),
        "visibility": np.ones(schema.num_entities, dtype=np.float32),
    }


# --------------------------------------------------------------------------------------------
# Multi-dSprites
# --------------------------------------------------------------------------------------------

DSPRITES_SHAPES = {1: "square", 2: "ellipse", 3: "heart"}
# (min, max) number of sprites per variant (DeepMind's README).
_SPRITE_COUNTS = {"colored_on_grayscale": (2, 5), "colored_on_colored": (1, 4), "binarized": (2, 3)}


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(N, 3) HSV in [0, 1] -> (N, 3) RGB in [0, 1]."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    options = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ]
    )  # (6, N, 3)
    return options[sector.astype(np.int64) % 6, np.arange(len(h))]


def _sprite_inside(
    shape_id: int, scale: float, orientation: float, cx: float, cy: float, size: int
) -> np.ndarray:
    """(size, size) bool coverage of one dSprites-like sprite (pixel centres)."""
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    radius = 0.16 * size * scale
    dx, dy = (cols - cx) / radius, (rows - cy) / radius
    cos, sin = np.cos(orientation), np.sin(orientation)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if shape_id == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape_id == 2:
        return u**2 + (v / 0.55) ** 2 <= 1.0
    hu, hv = 1.2 * u, -1.2 * v + 0.15  # heart, pointing down at orientation 0
    return (hu**2 + hv**2 - 1.0) ** 3 - hu**2 * hv**3 <= 0.0


def _multi_dsprites(schema: Schema, rng: np.random.Generator) -> Record:
    variant = schema.variant or "colored_on_grayscale"
    entities, channels = schema.num_entities, schema.channels
    size = schema.image_size[0]
    low, high = _SPRITE_COUNTS[variant]
    count = int(rng.integers(low, high + 1))
    shape = np.zeros(entities, dtype=np.float32)
    scale = np.zeros(entities, dtype=np.float32)
    orientation = np.zeros(entities, dtype=np.float32)
    x = np.zeros(entities, dtype=np.float32)
    y = np.zeros(entities, dtype=np.float32)
    sprites = slice(1, count + 1)
    shape[sprites] = rng.integers(1, 4, size=count)
    scale[sprites] = rng.choice(np.linspace(0.5, 1.0, 6), size=count)
    orientation[sprites] = rng.uniform(0.0, 2 * np.pi, size=count)
    x[sprites] = rng.uniform(0.0, 1.0, size=count)  # x: horizontal position, y: vertical
    y[sprites] = rng.uniform(0.0, 1.0, size=count)
    color = np.zeros((entities, channels), dtype=np.float32)
    if variant == "colored_on_grayscale":
        color[0] = rng.uniform(0.0, 1.0)
        hsv = np.column_stack(
            [rng.uniform(0, 1, count), rng.uniform(0.5, 1, count), rng.uniform(0.5, 1, count)]
        )
        color[sprites] = _hsv_to_rgb(hsv)
    elif variant == "colored_on_colored":
        color[: count + 1] = rng.uniform(0.0, 1.0, size=(count + 1, channels))
    else:  # binarized: white sprites on black
        color[sprites] = 1.0
    label = np.zeros((size, size), dtype=np.int64)
    for k in range(1, count + 1):  # painted in order: later sprites occlude earlier ones
        cx, cy = size * (0.15 + 0.7 * x[k]), size * (0.15 + 0.7 * y[k])
        label[_sprite_inside(int(shape[k]), scale[k], orientation[k], cx, cy, size)] = k
    palette = np.round(255.0 * color).astype(np.uint8)  # (E, C)
    masks = _one_hot_masks(label, entities)  # (E, H, W)
    return {
        "image": palette[label],  # (H, W, C)
        "mask": np.ascontiguousarray(np.moveaxis(masks, 0, -1))[..., None],  # (H, W, E, 1)
        "x": x,
        "y": y,
        "shape": shape,
        "color": color,
        "visibility": (np.arange(entities) <= count).astype(np.float32),
        "orientation": orientation,
        "scale": scale,
    }


# --------------------------------------------------------------------------------------------
# CLEVR with masks
# --------------------------------------------------------------------------------------------

# Our 1-byte codes (0 = null entity). CLEVR's palette (properties.json).
CLEVR_SIZES = {1: "large", 2: "small"}
CLEVR_MATERIALS = {1: "rubber", 2: "metal"}
CLEVR_SHAPES = {1: "cube", 2: "sphere", 3: "cylinder"}
CLEVR_COLORS = {
    1: (87, 87, 87),
    2: (173, 35, 35),
    3: (42, 75, 215),
    4: (29, 105, 20),
    5: (129, 74, 25),
    6: (129, 38, 192),
    7: (41, 208, 208),
    8: (255, 238, 51),
}
_CLEVR_PALETTE = np.array([(0, 0, 0), *CLEVR_COLORS.values()], dtype=np.float64) / 255.0


def _clevr_positions(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 2) ground-plane (x, y) in [-3, 3]², at least 0.9 apart when possible."""
    points = np.zeros((count, 2))
    for i in range(count):
        for _ in range(50):
            points[i] = rng.uniform(-3.0, 3.0, size=2)
            if i == 0 or np.min(np.hypot(*(points[:i] - points[i]).T)) >= 0.9:
                break
    return points


def _clevr_object(
    shape_code: int, radius: float, angle: float, cx: float, cy: float, hw: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Bounding-box slices, coverage and shading (1 at the top, darker below) of one object."""
    h, w = hw
    top, bottom = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, h)
    left, right = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, w)
    rows, cols = np.mgrid[top:bottom, left:right] + 0.5
    dy, dx = (rows - cy) / radius, (cols - cx) / radius
    if shape_code == 1:  # cube: a rotated square
        cos, sin = np.cos(angle), np.sin(angle)
        inside = np.maximum(np.abs(cos * dx + sin * dy), np.abs(-sin * dx + cos * dy)) <= 0.72
    elif shape_code == 2:  # sphere: a disc
        inside = dx**2 + dy**2 <= 1.0
    else:  # cylinder: an upright rectangle with rounded caps
        inside = (np.abs(dx) <= 0.8) & (
            (np.abs(dy) <= 0.7) | (dx**2 / 0.64 + (np.abs(dy) - 0.7) ** 2 / 0.09 <= 1)
        )
    shade = 1.0 - 0.35 * (dy + 1.0) / 2.0
    return (slice(top, bottom), slice(left, right)), inside, shade


def _clevr(schema: Schema, rng: np.random.Generator) -> Record:
    entities = schema.num_entities
    h, w = schema.image_size
    count = int(rng.integers(3, entities))  # 3..10 objects
    objects = slice(1, count + 1)
    codes = {
        name: np.zeros(entities, dtype=np.uint8) for name in ("size", "material", "shape", "color")
    }
    codes["size"][objects] = rng.integers(1, 3, count)
    codes["material"][objects] = rng.integers(1, 3, count)
    codes["shape"][objects] = rng.integers(1, 4, count)
    codes["color"][objects] = rng.integers(1, 9, count)
    ground = np.zeros((entities, 2), dtype=np.float32)
    ground[objects] = _clevr_positions(rng, count)
    rotation = np.zeros(entities, dtype=np.float32)
    rotation[objects] = rng.uniform(0.0, 360.0, count)
    z = np.where(codes["size"] == 1, 0.7, 0.35).astype(np.float32) * (codes["size"] > 0)
    pixel = np.zeros((entities, 3), dtype=np.float32)
    pixel[objects, 0] = w / 2 + 52.0 * ground[objects, 0]  # columns 4..316: some outside the crop
    pixel[objects, 1] = 130.0 + 22.0 * ground[objects, 1]  # rows 64..196
    pixel[objects, 2] = 12.0 - 2.0 * ground[objects, 1]  # depth from the camera
    rows = np.arange(h, dtype=np.float64)[:, None, None]
    image = np.broadcast_to(0.35 + 0.25 * rows / h, (h, w, 3)).copy()  # grey floor, lighter below
    label = np.zeros((h, w), dtype=np.int64)
    for k in np.argsort(-pixel[objects, 2], kind="stable") + 1:  # far to near: occlusion
        base = 26.0 if codes["size"][k] == 1 else 14.0
        radius = base * (0.75 + 0.5 * (ground[k, 1] + 3.0) / 6.0)
        cells, inside, shade = _clevr_object(
            int(codes["shape"][k]), radius, np.deg2rad(rotation[k]), *pixel[k, :2], (h, w)
        )
        gloss = 1.15 if codes["material"][k] == 2 else 1.0
        colour = _CLEVR_PALETTE[codes["color"][k]] * gloss
        label[cells][inside] = k
        image[cells][inside] = np.clip(shade[inside][:, None] * colour, 0.0, 1.0)
    visibility = (np.arange(entities) <= count).astype(np.float32)
    return {
        "image": np.round(255.0 * image).astype(np.uint8),
        "mask": _one_hot_masks(label, entities)[..., None],  # (E, H, W, 1)
        "x": ground[:, 0].copy(),
        "y": ground[:, 1].copy(),
        "z": z,
        "pixel_coords": pixel,
        "rotation": rotation,
        **codes,
        "visibility": visibility,
    }


# --------------------------------------------------------------------------------------------
# Objects Room
# --------------------------------------------------------------------------------------------

# (min, max) number of objects per variant; entities 0-3 are sky, floor, left and right wall.
_ROOM_OBJECTS = {
    "train": (0, 3),
    "six_objects": (6, 6),
    "empty_room": (0, 0),
    "identical_color": (4, 6),
}


def _objects_room(schema: Schema, rng: np.random.Generator) -> Record:
    variant = schema.variant or "train"
    entities = schema.num_entities
    size = schema.image_size[0]
    low, high = _ROOM_OBJECTS[variant]
    count = int(rng.integers(low, high + 1))
    rows, cols = np.mgrid[0:size, 0:size]
    horizon = int(rng.integers(8, 17))
    floor_line = int(rng.integers(34, 45))
    corner = int(rng.integers(20, 45))
    label = np.where(
        rows < horizon, 0, np.where(rows >= floor_line, 1, np.where(cols < corner, 2, 3))
    )
    colors = rng.uniform(0.1, 1.0, size=(entities, 3))
    if variant == "identical_color":
        colors[4:] = colors[4]
    centres = np.column_stack(
        [rng.uniform(horizon + 8, size - 4, count), rng.uniform(4, size - 4, count)]
    )
    for i in np.argsort(centres[:, 0], kind="stable"):  # far (high) to near (low): occlusion
        radius = rng.uniform(4.0, 9.0)
        dy, dx = (rows + 0.5 - centres[i, 0]) / radius, (cols + 0.5 - centres[i, 1]) / radius
        kind = rng.integers(0, 3)
        if kind == 0:
            inside = dx**2 + dy**2 <= 1.0
        elif kind == 1:
            inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.8
        else:
            inside = (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) / 2.0)
        label[inside] = 4 + i
    palette = np.round(255.0 * colors).astype(np.uint8)
    return {"image": palette[label], "mask": _one_hot_masks(label, entities)[..., None]}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[[Schema, np.random.Generator], Record]] = {
    "tetrominoes": _tetrominoes,
    "multi_dsprites": _multi_dsprites,
    "clevr_with_masks": _clevr,
    "objects_room": _objects_room,
}


def synthesize(
    dataset: str, n: int, seed: int, variant: str | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``n`` generated records of ``dataset`` in its DeepMind schema.

    Args:
        dataset: ``tetrominoes``, ``multi_dsprites``, ``clevr_with_masks`` (or ``clevr6`` /
            ``clevr10``) or ``objects_room``.
        n: number of records.
        seed: the same seed gives the same records.
        variant: see ``catalog.resolve_variant`` (default variant when ``None``).

    Yields:
        ``{feature: array}`` in schema order with the schema's shapes and dtypes, e.g. for
        Tetrominoes image (35, 35, 3) uint8, mask (4, 35, 35, 1) uint8, x / y / shape /
        visibility (4,) float32, color (4, 3) float32.
    """
    schema = get_schema(dataset, variant)
    generate = _GENERATORS[schema.dataset]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        record = generate(schema, rng)
        yield {spec.name: record[spec.name] for spec in schema.features}


def write_synthetic(
    dataset: str, out: str | Path, n: int, seed: int, variant: str | None = None
) -> Path:
    """Write ``synthesize(dataset, n, seed, variant)`` as a whole-file GZIP TFRecord.

    The file is written to ``<out>.partial`` and renamed at the end, so ``out`` is complete or
    absent. Returns ``out`` as a ``Path``.
    """
    out = Path(out)
    write_examples(out, synthesize(dataset, n, seed, variant), compression="gzip")
    return out


# --------------------------------------------------------------------------------------------
# Writing TFRecord files
# --------------------------------------------------------------------------------------------


class TFRecordWriter:
    """Write records to a TFRecord file, whole-file GZIP by default (as DeepMind's files).

    Use as a context manager; ``close()`` finishes the compressed stream.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        compression: Literal["gzip", "zlib", "none"] = "gzip",
        level: int = 6,
    ) -> None:
        if compression not in ("gzip", "zlib", "none"):
            raise ValueError(f"compression must be gzip, zlib or none, not {compression!r}")
        self.path = Path(path)
        self._handle: BinaryIO | None = open(self.path, "wb")
        wbits = {"gzip": 31, "zlib": 15, "none": 0}[compression]
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, wbits) if wbits else None
        self.count = 0

    def write(self, data: bytes) -> None:
        """Append one record (raw bytes, e.g. ``encode_example(...)``)."""
        if self._handle is None:
            raise ValueError(f"{self.path}: writer is closed")
        frame = frame_record(data)
        if self._compressor is not None:
            frame = self._compressor.compress(frame)
        self._handle.write(frame)
        self.count += 1

    def write_example(self, features: Mapping[str, FeatureValue]) -> None:
        """Append one ``tf.train.Example`` (see ``tf_example.encode_example``)."""
        self.write(encode_example(features))

    def close(self) -> None:
        """Finish the compressed stream and close the file."""
        if self._handle is None:
            return
        try:
            if self._compressor is not None:
                self._handle.write(self._compressor.flush())
        finally:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_examples(
    path: str | os.PathLike[str],
    examples: Iterable[Mapping[str, FeatureValue]],
    compression: Literal["gzip", "zlib", "none"] = "gzip",
) -> int:
    """Atomically write ``examples`` as a TFRecord file; returns the number of records."""
    with atomic_write(path) as partial, TFRecordWriter(partial, compression) as writer:
        for example in examples:
            writer.write_example(example)
    return writer.count
