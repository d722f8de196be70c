import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dti_sprites.io import partial_path
from dti_sprites.sweep import chord_distances, elbow, main, run_config, write_csv
from dti_sprites.viz import sweep_figure

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ elbow rule
def test_elbow_of_a_piecewise_linear_curve_is_its_knee():
    ks = [10, 15, 19, 25, 30]
    losses = [0.01 * max(19 - k, 0) + 1e-4 * (30 - k) for k in ks]  # steep, then nearly flat
    assert elbow(ks, losses) == 19
    # Any order, any scale and offset of the loss.
    order = [3, 0, 4, 2, 1]
    assert elbow([ks[i] for i in order], [5 + 1e3 * losses[i] for i in order]) == 19
    for knee in (3, 5, 8):
        ks = list(range(1, 11))
        assert elbow(ks, [max(knee - k, 0) + 0.01 * (10 - k) for k in ks]) == knee


def test_chord_distance_of_1_over_k_is_exact():
    ks = np.arange(1, 11)
    # Scaled axes: x = (k-1)/9, y = (1/k - 0.1)/0.9; chord y = 1 - x; distance (1 - x - y)/√2.
    expected = (11 - ks - 10 / ks) / (9 * math.sqrt(2))
    np.testing.assert_allclose(chord_distances(ks, 1 / ks), expected, atol=1e-12)
    assert elbow(ks, 1 / ks) == 3  # 11 - k - 10/k is largest at k = 3 (4.67 > 4.5 at k = 4)


@pytest.mark.parametrize(
    "losses",
    [
        [5.0, 4.0, 3.0, 2.0, 1.0],  # straight line
        [5.0, 4.9, 4.6, 3.9, 1.0],  # concave: every point above the chord
        [2.0, 2.0, 2.0, 2.0, 2.0],  # constant
    ],
)
def test_no_elbow_without_a_point_below_the_chord(losses):
    assert elbow([1, 2, 3, 4, 5], losses) is None


def test_no_elbow_with_fewer_than_three_points():
    assert elbow([10, 20], [1.0, 0.5]) is None
    assert chord_distances([10, 20], [1.0, 0.5]).tolist() == [0.0, 0.0]


# -------------------------------------------------------------------------------- outputs
def test_csv_and_png_mark_the_elbow(tmp_path):
    records = [
        {"k": k, "final_loss": 0.01 * max(19 - k, 0) + 1e-4 * (30 - k), "steps": 7}
        for k in (25, 10, 19, 30, 15)
    ]
    rows = write_csv(records, tmp_path / "k_sweep.csv")
    with open(tmp_path / "k_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["k"]) for r in table] == [10, 15, 19, 25, 30]
    assert [int(r["elbow"]) for r in table] == [0, 0, 1, 0, 0]
    assert float(table[2]["distance"]) == pytest.approx(max(float(r["distance"]) for r in table))
    assert [r["k"] for r in rows] == [10, 15, 19, 25, 30]
    assert not partial_path(tmp_path / "k_sweep.csv").exists()

    ks, losses = [r["k"] for r in rows], [r["final_loss"] for r in rows]
    (ax,) = sweep_figure(ks, losses, 19).axes
    line = ax.lines[0]  # the curve: every (K, loss) in order of K
    assert line.get_xdata().tolist() == [10, 15, 19, 25, 30]
    assert line.get_ydata().tolist() == pytest.approx(losses)
    marks = [artist for artist in ax.lines[1:] if artist.get_color() == "tab:red"]
    assert {float(x) for m in marks for x in m.get_xdata()} == {19.0}  # the dashed line, the ring
    assert [t.get_text() for t in ax.texts] == ["elbow K=19"]
    (plain,) = sweep_figure(ks, losses, None).axes
    assert len(plain.lines) == 1 and not plain.texts


def test_run_config_moves_every_output_into_the_run_folder(tmp_path):
    base = yaml.safe_load((EXPERIMENTS / "tetrominoes.yaml").read_text())
    config = run_config(base, tmp_path / "k7", "tetrominoes-k7")
    logger = config["trainer"]["logger"]["init_args"]
    assert logger["save_dir"] == str(tmp_path / "k7") and logger["name"] == "tetrominoes-k7"
    epoch_end, periodic = [
        c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    ]
    for checkpoint in (epoch_end, periodic):
        assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "k7" / "checkpoints")
    assert epoch_end["init_args"] == {
        "dirpath": str(tmp_path / "k7" / "checkpoints"),
        "save_last": True,
        "enable_version_counter": False,
    }
    assert periodic["init_args"]["every_n_train_steps"] == 1000
    assert "save_dir" not in base["trainer"]["logger"]["init_args"]  # a copy
    config["trainer"].pop("logger")
    config["trainer"].pop("callbacks")
    base["trainer"].pop("logger")
    base["trainer"].pop("callbacks")
    assert config == base  # nothing else changes


# ----------------------------------------------------------------------------- end to end
def test_k_sweep_trains_once_per_k_and_writes_csv_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths of the config would land here
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    out = tmp_path / "sweep"
    data = tmp_path / "data" / "tetrominoes.h5"
    argv = [
        "k",
        "--config",
        str(EXPERIMENTS / "tetrominoes.yaml"),
        "--k",
        "3",
        "2",
        "4",
        "--out",
        str(out),
        "--window",
        "2",
        # Tiny overrides, passed through to every fit:
        f"--data.init_args.path={data}",
        "--data.init_args.generate=64",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--data.init_args.in_memory=true",
        "--trainer.max_steps=3",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    assert main(argv) == 0
    with open(out / "k_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["k"]) for r in table] == [2, 3, 4]
    for row in table:
        k = int(row["k"])
        record = json.loads((out / f"k{k}" / "final_loss.json").read_text())
        assert record["k"] == k  # the override reached the model
        assert record["steps"] == 3 and record["window"] == 2
        assert float(row["final_loss"]) == pytest.approx(record["final_loss"])
        assert 0 < record["final_loss"] < 1
        # Each K has its own W&B run and checkpoints (the config's shared folders moved).
        assert (out / f"k{k}" / "checkpoints" / "last.ckpt").is_file()
        assert len(list((out / f"k{k}" / "wandb").glob("offline-run-*"))) == 1
    expected = elbow([2, 3, 4], [float(r["final_loss"]) for r in table])
    assert [int(r["elbow"]) for r in table] == [int(k == expected) for k in (2, 3, 4)]
    with Image.open(out / "k_sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    printed = capsys.readouterr().out
    assert "k_sweep.csv" in printed and "K=   3" in printed
    assert not (tmp_path / "runs").exists()  # nothing in the config's own folders


def test_k_sweep_rejects_bad_arguments_before_training(tmp_path, capsys):
    config = str(EXPERIMENTS / "tetrominoes.yaml")
    assert main(["k", "--config", config, "--k", "3", "3", "--out", str(tmp_path)]) == 2
    assert "distinct" in capsys.readouterr().err
    assert main(["k", "--config", str(tmp_path / "none.yaml"), "--k", "3"]) == 2
    assert "config not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["k", "--config", config])  # --k is required
    assert not list(tmp_path.iterdir())
