import argparse
import json

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from small_model import SMALL_MODEL, quiet_trainer
from torch.utils.data import DataLoader

from dti_sprites.decompose import add_refinement_arguments, apply_refinement, main
from dti_sprites.io import partial_path
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule

MODEL = SMALL_MODEL


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real training checkpoint after one step of `fit`."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    module = DTISpritesModule(DTISprites(**MODEL), lr=1e-2)
    data = DataLoader(
        [
            {"image": torch.from_numpy(scenes(4, 3, seed=i)[0]).permute(2, 0, 1) / 255}
            for i in range(8)
        ],
        batch_size=4,
    )
    trainer = quiet_trainer(tmp, max_steps=1)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp / "model.ckpt")
    return tmp / "model.ckpt"


def scenes(n: int, channels: int, seed: int = 0) -> np.ndarray:
    """(n, 20, 20, channels) uint8: black, with a bright square at the centre of even images."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 20, 20, channels), np.uint8)
    images[::2, 5:15, 5:15] = rng.integers(150, 256, (len(images[::2]), 1, 1, channels))
    return images


def expected(ckpt, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What the model gives for (N, H, W, 3) uint8 images: arrays and selected parameters."""
    model = DTISprites.from_checkpoint(ckpt)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        out = model(x)
    return out.to_arrays(x), {k: v.numpy() for k, v in out.params.items()}


def write_h5(path, images: np.ndarray, source_index: np.ndarray | None = None) -> None:
    with h5py.File(path, "w") as f:
        f["image"] = images
        if source_index is not None:
            f["source_index"] = source_index


@pytest.mark.parametrize("channels, source", [(3, True), (1, False)])
def test_hdf5_input_gives_the_model_arrays_pngs_and_json(tmp_path, ckpt, channels, source):
    images = scenes(5, channels)
    source_index = np.arange(100, 105, dtype=np.int64) if source else None
    write_h5(tmp_path / "in.h5", images, source_index)
    out, png = tmp_path / "pred" / "predictions.h5", tmp_path / "png"
    argv = [
        "--ckpt",
        str(ckpt),
        "--input",
        str(tmp_path / "in.h5"),
        "--out",
        str(out),
        "--png",
        str(png),
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    arrays, params = expected(ckpt, np.repeat(images, 3 // channels, axis=3))
    with h5py.File(out) as f:
        for key, value in arrays.items():
            assert f[key].dtype == value.dtype, key
            np.testing.assert_array_equal(f[key][()], value, err_msg=key)
        assert f["index"][()].tolist() == list(range(5))
        assert f["source_index"][()].tolist() == (
            list(range(100, 105)) if source else list(range(5))
        )
        assert f.attrs["input"] == str(tmp_path / "in.h5")
        assert json.loads(f.attrs["model_config"])["n_sprites"] == 3
    assert not partial_path(tmp_path / "pred" / "predictions.h5").exists()

    names = sorted(p.name for p in png.iterdir())
    assert len(names) == 5 * (2 + 1 + 1)  # 2 layers, reconstruction, json per image
    for i in (0, 4):
        for layer in range(2):
            with Image.open(png / f"{i}_layer{layer}.png") as im:
                assert im.mode == "RGBA"
                np.testing.assert_array_equal(np.asarray(im), arrays["layers"][i, layer])
        with Image.open(png / f"{i}_reconstruction.png") as im:
            np.testing.assert_array_equal(np.asarray(im), arrays["reconstruction"][i])
        record = json.loads((png / f"{i}.json").read_text())
        assert record["index"] == i and record["source"] == (100 + i if source else i)
        choice = arrays["sprite_choice"][i].tolist()
        assert max(choice) >= 0 if i % 2 == 0 else min(choice) < 0  # sprites and empty layers
        assert record["sprite_choice"] == [None if k < 0 else k for k in choice]
        for layer, entry in enumerate(record["layers"]):
            assert entry["sprite"] == (None if choice[layer] < 0 else choice[layer])
            np.testing.assert_allclose(
                entry["params"]["layer/position"], params["layer/position"][i, layer], rtol=1e-6
            )
            assert ("sprite/similarity" in entry["params"]) == (choice[layer] >= 0)
        np.testing.assert_allclose(
            record["background"]["params"]["background/color"],
            params["background/color"][i],
            rtol=1e-6,
        )
    assert not list(tmp_path.glob(".png.tmp-*"))


def test_folder_input_is_resized_and_centre_cropped(tmp_path, ckpt):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    wide.save(folder / "b_wide.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / "sub" / "c.png")
    Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(folder / "a_tall.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions.h5"
    assert main(["--ckpt", str(ckpt), "--input", str(folder), "--out", str(out)]) == 0
    with h5py.File(out) as f:
        assert [p.decode() for p in f["path"][()]] == ["a_tall.png", "b_wide.png", "sub/c.png"]
        assert f["index"][()].tolist() == [0, 1, 2]
        assert "source_index" not in f
        recon = f["reconstruction"][()]
    # Short side to 20 (PIL bilinear, antialiased), then the centre 20 × 20.
    crop = TF.center_crop(TF.resize(wide, 20, antialias=True), [20, 20])
    assert crop.size == (20, 20)
    arrays, _ = expected(ckpt, np.asarray(crop)[None])
    np.testing.assert_array_equal(recon[1], arrays["reconstruction"][0])


def test_errors_name_the_path_and_leave_no_output(tmp_path, ckpt, capsys):
    out, png = tmp_path / "out" / "predictions.h5", tmp_path / "png"

    def run(ckpt_path, source) -> str:
        argv = [
            "--ckpt",
            str(ckpt_path),
            "--input",
            str(source),
            "--out",
            str(out),
            "--png",
            str(png),
        ]
        assert main(argv) == 1
        assert not out.exists() and not partial_path(out).exists()
        assert not png.exists() and not list(tmp_path.glob(".png.tmp-*"))
        return capsys.readouterr().err

    images = np.zeros((3, 20, 20, 3), np.uint8)
    write_h5(tmp_path / "ok.h5", images)
    assert "checkpoint not found" in run(tmp_path / "missing.ckpt", tmp_path / "ok.h5")
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    assert str(tmp_path / "bad.ckpt") in run(tmp_path / "bad.ckpt", tmp_path / "ok.h5")
    write_h5(tmp_path / "big.h5", np.zeros((2, 24, 24, 3), np.uint8))
    err = run(ckpt, tmp_path / "big.h5")
    assert "24×24" in err and "20×20" in err and "Note" in err
    (tmp_path / "text.h5").write_text("hello")
    assert "text.h5" in run(ckpt, tmp_path / "text.h5")
    assert "input not found" in run(ckpt, tmp_path / "nowhere")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    assert str(folder / "b.png") in run(ckpt, folder)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt)])  # --input and --out are required


def test_refinement_options_override_the_models_and_are_recorded(tmp_path, ckpt, capsys):
    images = scenes(4, 3)
    write_h5(tmp_path / "in.h5", images)
    out = tmp_path / "refined.h5"
    argv = ["--ckpt", str(ckpt), "--input", str(tmp_path / "in.h5"), "--out", str(out)]
    flags = ["--pose-refinement", "20", "--pose-refinement-rounds", "2", "--order-search"]
    assert main([*argv, *flags]) == 0
    model = DTISprites.from_checkpoint(ckpt)
    model.set_pose_refinement(20, model.pose_refinement_lr, 2, True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        refined = model(x).to_arrays(x)
    with h5py.File(out) as f:
        settings = json.loads(f.attrs["refinement"])
        assert settings == {
            "pose_refinement": 20,
            "pose_refinement_lr": 0.02,
            "pose_refinement_rounds": 2,
            "order_search": True,
            "residual_placement": 0.0,
        }
        assert np.array_equal(f["reconstruction"][:], refined["reconstruction"])
    plain = tmp_path / "plain.h5"
    assert main(["--ckpt", str(ckpt), "--input", str(tmp_path / "in.h5"), "--out", str(plain)]) == 0
    with h5py.File(plain) as f:
        assert json.loads(f.attrs["refinement"])["pose_refinement"] == 0  # the model's own
        assert not np.array_equal(f["reconstruction"][:], refined["reconstruction"])
    assert main([*argv, "--pose-refinement-rounds", "0"]) == 1
    assert "pose_refinement_rounds" in capsys.readouterr().err


def test_refinement_options_override_only_their_own_setting():
    """On a model that refines already: one option changes its setting, the rest stay."""
    torch.manual_seed(0)
    refining = dict(pose_refinement=7, order_search=True, residual_placement=0.1)
    model = DTISprites(**{**SMALL_MODEL, **refining})
    parser = argparse.ArgumentParser()
    add_refinement_arguments(parser)
    settings = apply_refinement(model, parser.parse_args(["--pose-refinement-rounds", "2"]))
    expected = dict(
        pose_refinement=7,
        pose_refinement_lr=0.02,
        pose_refinement_rounds=2,
        order_search=True,
        residual_placement=0.1,
    )
    assert settings == expected == model.refinement_settings()
    apply_refinement(model, parser.parse_args(["--no-order-search", "--residual-placement", "0"]))
    assert not model.order_search and model.residual_placement == 0.0
    assert model.pose_refinement == 7 and model.pose_refinement_rounds == 2
