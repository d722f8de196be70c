import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from small_model import SMALL_MODEL

from dti_sprites.callbacks import (
    Curriculum,
    EvalReport,
    LayerReset,
    SpriteDashboard,
    SpriteFreeze,
    SpriteReassignment,
    SpriteSeeding,
    event_log,
    run_dir,
)
from dti_sprites.callbacks.eval_report import EvalRecords
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule, usage_counts
from dti_sprites.viz import add_timeline, sprite_figure

MODEL = {**SMALL_MODEL, "empty_sprite": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline with every W&B folder inside tmp_path (no login, no network, no home)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dashboard_writes_wandb_media_offline_and_the_same_pngs(offline_wandb, squares):
    tmp_path = offline_wandb
    torch.manual_seed(0)
    wandb_logger = WandbLogger(project="dash", save_dir=tmp_path, offline=True)
    reassignment = SpriteReassignment(every_n_steps=1, threshold=10.0)  # fires after the freeze
    dashboard = SpriteDashboard(every_n_steps=2)
    report = EvalReport(n_worst=3)  # the evaluation report
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=[wandb_logger, CSVLogger(tmp_path / "csv")],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[Curriculum(sprite=[1]), SpriteFreeze(epochs=1), reassignment, dashboard, report],
    )
    module = DTISpritesModule(DTISprites(**MODEL), lr=1e-2)
    data = squares(n=8)
    trainer.fit(module, data)
    # One dict per protocol (dataloader): each protocol's metrics are logged with its batches.
    results = {
        k: v
        for per_loader in trainer.test(module, data, verbose=False)
        for k, v in per_loader.items()
    }
    wandb_logger.experiment.finish()

    # PNGs and CSVs in the run folder, for a user without W&B.
    folder = run_dir(trainer)
    assert folder.parent == tmp_path / "dash"
    for name in (
        "sprites",
        "backgrounds",
        "decompositions",
        "usage",
        "val_paper320_worst",
        "val_heldout_worst",
        "test_paper320_worst",
        "test_heldout_worst",
    ):
        assert (folder / "images" / f"{name}.png").is_file(), name
    assert not list(folder.rglob("*.partial"))  # no temporary file of atomic_write left

    events = reassignment.events
    assert events and min(e["step"] for e in events) >= 3  # after the frozen first epoch
    rows = read_csv(folder / "tables" / "reassignments.csv")
    assert [(int(r["step"]), int(r["src"]), int(r["dst"])) for r in rows] == [
        (e["step"], e["src"], e["dst"]) for e in events
    ]
    usage = read_csv(folder / "tables" / "usage.csv")
    assert [(r["layer"], r["sprite"]) for r in usage[:4]] == [
        ("0", "0"),
        ("0", "1"),
        ("0", "2"),
        ("0", "empty"),
    ]
    for layer in ("0", "1"):  # steps 3-4 since the drawing at step 2: 2 batches of 4 images
        assert sum(int(r["count"]) for r in usage if r["layer"] == layer) == 8
        assert sum(float(r["share"]) for r in usage if r["layer"] == layer) == pytest.approx(1)

    metrics = read_csv(folder / "tables" / "test_metrics.csv")
    table = {(r["protocol"], r["metric"]): float(r["value"]) for r in metrics}
    assert table[("paper320", "ari_fg")] == pytest.approx(results["test/paper320/ari_fg"])
    assert table[("heldout", "miou")] == pytest.approx(results["test/heldout/miou"])
    per_image = read_csv(folder / "tables" / "test_ari_fg.csv")
    assert len(per_image) == 16  # 8 images × 2 protocols
    scores = [float(r["ari_fg"]) for r in per_image]
    assert scores == sorted(scores)
    paper = [float(r["ari_fg"]) for r in per_image if r["protocol"] == "paper320"]
    assert np.mean(paper) == pytest.approx(results["test/paper320/ari_fg"], abs=1e-6)
    assert sorted(int(r["index"]) for r in per_image if r["protocol"] == "paper320") == list(
        range(8)
    )

    # Curriculum and freeze stage as logged scalars, per step.
    logged = read_csv(Path(trainer.loggers[1].log_dir) / "metrics.csv")
    stage = [
        (
            int(r["step"]),
            float(r["stage/sprites_frozen"]),
            float(r["stage/active_sprite_transforms"]),
        )
        for r in logged
        if r.get("stage/sprites_frozen")
    ]
    assert stage == [(0, 1.0, 0.0), (1, 1.0, 0.0), (2, 0.0, 1.0), (3, 0.0, 1.0)]

    # The offline W&B run folder holds the images and the tables.
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    images = {
        (*p.relative_to(media / "images").parts[:-1], p.name.rsplit("_", 2)[0])
        for p in (media / "images").rglob("*.png")
    }
    for name in (
        ("dashboard", "sprites"),
        ("dashboard", "backgrounds"),
        ("dashboard", "decompositions"),
        ("dashboard", "usage"),
        ("val", "paper320", "worst"),
        ("test", "heldout", "worst"),
    ):
        assert name in images, name
    # The last decomposition logged is the labelled picture of images/decompositions.png.
    logged = max(
        (media / "images" / "dashboard").glob("decompositions_*.png"),
        key=lambda p: int(p.name.rsplit("_", 2)[1]),
    )
    with Image.open(logged) as a, Image.open(folder / "images" / "decompositions.png") as b:
        np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b))
    tables = {
        str(p.relative_to(media / "table")).rsplit("_", 2)[0]: p
        for p in (media / "table").rglob("*.table.json")
    }
    for name in (
        "dashboard/usage_table",
        "dashboard/usage_layer0_table",
        "dashboard/usage_layer1_table",
        "dashboard/reassignments",
        "dashboard/events",
        "val/metrics_table",
        "val/ari_fg_table",
        "test/metrics_table",
        "test/ari_fg_table",
    ):
        assert name in tables, name
    logged_table = json.loads(tables["test/ari_fg_table"].read_text())
    assert logged_table["columns"] == [
        "protocol",
        "index",
        "ari_fg",
        "image",
        "reconstruction",
        "instance",
        "ground_truth",
    ]
    assert len(logged_table["data"]) == 16
    with_thumbnails = [row for row in logged_table["data"] if row[3] is not None]
    assert len(with_thumbnails) == 6  # the 3 worst of each protocol
    for protocol in ("paper320", "heldout"):
        worst = sorted(float(r["ari_fg"]) for r in per_image if r["protocol"] == protocol)[:3]
        assert sorted(row[2] for row in with_thumbnails if row[0] == protocol) == worst
    events_table = json.loads(tables["dashboard/reassignments"].read_text())
    assert events_table["columns"] == ["step", "src", "dst"]
    # Table images are staged as PNGs for the run's table artifacts (WANDB_DATA_DIR).
    staged = [p for p in (tmp_path / "wandb_data_dir").rglob("*") if p.is_file()]
    assert sum(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in staged) >= 6 * 4


def test_dashboard_without_logger_on_single_object_data(tmp_path, squares):
    torch.manual_seed(0)
    model = DTISprites(
        image_size=20, n_sprites=2, n_layers=1, n_backgrounds=1, sprite_size=12, mask_std=3
    )
    dashboard = SpriteDashboard(every_n_steps=1, n_images=3)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[dashboard, EvalReport()],
    )
    trainer.fit(DTISpritesModule(model), squares(n=8))
    for name in ("sprites", "backgrounds", "decompositions", "usage"):
        assert (tmp_path / "images" / f"{name}.png").is_file(), name
    with Image.open(tmp_path / "images" / "decompositions.png") as picture:
        # 3 images × (in, rec, sem, inst, layer) of 20 pixels, and labels beside and above.
        assert picture.size[0] > 3 * 21 + 1 and picture.size[1] > 5 * 21 + 1
    metrics = read_csv(tmp_path / "tables" / "val_metrics.csv")
    assert {(r["protocol"], r["metric"]) for r in metrics} >= {("paper320", "fg_iou")}
    assert not (tmp_path / "tables" / "val_ari_fg.csv").exists()  # no ARI-FG on single objects


def test_dashboard_zoom_enlarges_the_pictures(tmp_path, squares):
    sizes = {}
    for zoom in (1, 3):  # the same seeded run drawn at two zooms
        torch.manual_seed(0)
        model = DTISprites(
            image_size=20, n_sprites=2, n_layers=1, n_backgrounds=1, sprite_size=12, mask_std=3
        )
        folder = tmp_path / f"zoom{zoom}"
        trainer = L.Trainer(
            default_root_dir=folder,
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[SpriteDashboard(every_n_steps=100, n_images=2, zoom=zoom)],
        )
        trainer.fit(DTISpritesModule(model), squares(n=4))
        for name in ("sprites", "decompositions"):
            with Image.open(folder / "images" / f"{name}.png") as picture:
                sizes[zoom, name] = picture.size
    # (width, height) of the grids: 2 sprites of 12 + 2 border pixels × 3 rows; 2 images of 20
    # pixels × (input, reconstruction, semantic, instance, 1 layer). The labels do not zoom.
    grids = {"sprites": (2 * 15 + 1, 3 * 15 + 1), "decompositions": (2 * 21 + 1, 5 * 21 + 1)}
    for name, grid in grids.items():
        growth = np.subtract(sizes[3, name], sizes[1, name])
        np.testing.assert_allclose(growth, 2 * np.array(grid), atol=2, err_msg=name)


def test_usage_counts_per_layer_and_sprite():
    choice = torch.tensor([[0, -1], [2, -1], [2, 1], [2, 0]])  # (B=4, L=2), -1 = empty
    counts = usage_counts(choice, n_sprites=3)
    assert counts.tolist() == [[1, 0, 3, 0], [1, 1, 0, 2]]  # the last column: the empty sprite


def test_eval_records_keep_the_worst_images_and_merge_ranks():
    records = EvalRecords(capacity=3)
    images = torch.rand(6, 3, 4, 4)
    masks = torch.randint(0, 3, (6, 4, 4))
    records.add(torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0, 1, 2]), images[:3], masks[:3])
    records.add(torch.tensor([0.1, 0.5, 1.0]), torch.tensor([3, 4, 5]), images[3:], masks[3:])
    assert records.index == [0, 1, 2, 3, 4, 5]
    assert records.worst_index.tolist() == [3, 1, 2]  # ascending score, ties by index
    torch.testing.assert_close(records.worst_image[0], (images[3] * 255).round().byte())
    assert torch.equal(records.worst_mask[1], masks[1].byte())
    other = EvalRecords(capacity=3)  # another rank, with one padded duplicate (index 5)
    other.add(torch.tensor([0.0, 1.0]), torch.tensor([6, 5]), images[:2], masks[:2])
    records.merge(other)
    assert records.index == [0, 1, 2, 3, 4, 5, 6]
    assert records.worst_index.tolist() == [6, 3, 1]


DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, {tests!r})
from conftest import SquaresDataModule

from dti_sprites.callbacks import EvalReport
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule

torch.set_num_threads(1)
L.seed_everything(0, verbose=False)
model = DTISprites(image_size=20, n_sprites=3, n_layers=2, n_backgrounds=1, sprite_size=12,
                   mask_std=3, occlusion="predicted")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    default_root_dir={out!r}, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[EvalReport(n_worst=3)])
per_loader = trainer.test(DTISpritesModule(model), SquaresDataModule(n=8), verbose=False)
if trainer.is_global_zero:
    torch.save({{k: v for r in per_loader for k, v in r.items()}}, Path({out!r}) / "results.pt")
"""


@pytest.mark.slow
def test_dashboard_gathers_per_image_rows_from_every_ddp_rank(tmp_path):
    script = tmp_path / "ddp_dashboard.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    rows = read_csv(tmp_path / "tables" / "test_ari_fg.csv")
    for protocol in ("paper320", "heldout"):
        mine = [r for r in rows if r["protocol"] == protocol]
        assert sorted(int(r["index"]) for r in mine) == list(range(8))  # both halves, once
        mean = np.mean([float(r["ari_fg"]) for r in mine])
        assert mean == pytest.approx(results[f"test/{protocol}/ari_fg"], abs=1e-6)
    with Image.open(tmp_path / "images" / "test_paper320_worst.png") as worst:
        # 3 worst images × (input, reconstruction, instance, ground truth), and the labels.
        assert worst.size[0] > 3 * 21 + 1 and worst.size[1] > 4 * 21 + 1


def test_event_log_gathers_every_callback_in_step_order():
    seeding = SpriteSeeding(at_step=4, collect_steps=2, refit_every=2, split_merge_moves=2)
    seeding.events = [
        {"step": 4, "kind": "seed", "crops": 30, "moves": [(0, 2)]},
        {"step": 6, "kind": "refit", "crops": 12, "refit": 3, "moves": []},
    ]
    reset = LayerReset()
    reset.events = [{"step": 5, "layer": 1}]
    reassignment = SpriteReassignment()
    reassignment.events = [{"step": 6, "src": 0, "dst": 1}]
    freeze = SpriteFreeze(steps=4)
    freeze.events = [{"step": 4}]
    trainer = SimpleNamespace(callbacks=[reset, seeding, freeze, reassignment])
    log = event_log(trainer)
    assert [(e.step, e.kind, e.source) for e in log] == [
        (4, "seed", "SpriteSeeding"),
        (4, "split-merge", "SpriteSeeding"),
        (4, "unfreeze", "SpriteFreeze"),
        (5, "layer reset", "LayerReset"),
        (6, "refit", "SpriteSeeding"),
        (6, "reassignment", "SpriteReassignment"),
    ]
    assert log[1].sprites == (0, 2) and log[-1].sprites == (1,)
    assert log[0].row()[:3] == [4, "seed", "SpriteSeeding"]
    # The timeline under the sprites: a taller picture, the grid as large as before.
    torch.manual_seed(0)
    model = DTISprites(**MODEL)
    plain = sprite_figure(model).get_size_inches()
    with_timeline = add_timeline(sprite_figure(model), [(e.step, e.kind) for e in log], 8)
    width, height = with_timeline.get_size_inches()
    assert width == plain[0] and height > plain[1]
    assert len(with_timeline.axes[1].get_yticklabels()) == 6  # a row per kind


def test_dashboard_writes_the_event_log(tmp_path, squares):
    torch.manual_seed(0)
    reassignment = SpriteReassignment(every_n_steps=1, threshold=10.0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[SpriteFreeze(epochs=1), reassignment, SpriteDashboard(every_n_steps=100)],
    )
    trainer.fit(DTISpritesModule(DTISprites(**MODEL), lr=1e-2), squares(n=8))
    rows = read_csv(tmp_path / "tables" / "events.csv")
    kinds = [(int(r["step"]), r["kind"]) for r in rows]
    assert kinds[0] == (2, "unfreeze")  # epoch 1 starts after 2 steps
    assert kinds[1:] == [(e["step"], "reassignment") for e in reassignment.events]
    assert rows[1]["sprites"] == str(reassignment.events[0]["dst"])
