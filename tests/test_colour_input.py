"""Colour input for 2D image folders (dataset.channels auto | rgb | gray): the reader, the cache and its key, the
training split's per-channel statistics, training, infer.py, eval and the other consumers of cached colour slices.

The dataset: 64 px RGB PNGs whose lesion (a disc) differs from the background only in hue, at the same luma (a
random grey texture underneath both), so a grey model has nothing to see."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.config import config_from_dict
from medseg.data.cache import CacheEstimate, build_cache, cache_bytes, dataset_dir_for, prep_dir_for
from medseg.data.sources import open_source, open_source_from_config
from medseg.errors import BadLabelError, ConfigError, DataError
from medseg.io_utils import stable_hash
from tests.conftest import TINY_MODEL
from tests.fixtures import make_msd, tiny_case, write_image

ROOT = Path(__file__).resolve().parents[1]
CVC_DIR = ROOT.parent / "shared" / "data" / "cvc-clinicdb"
LUMA = np.array([0.299, 0.587, 0.114])
CHROMA = np.array([1.0, -0.299 / 0.587, 0.0])  # a direction of zero luma: red up, green down
N_CASES = 12


def colour_frame(seed: int, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (rows, cols, 3), mask uint8 0/255): reddish disc on greenish ground, both on one grey texture."""
    rng = np.random.default_rng(seed)
    rows, cols = size
    yy, xx = np.mgrid[:rows, :cols]
    cy, cx, r = rng.integers(16, rows - 16), rng.integers(16, cols - 16), rng.integers(7, 12)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    grey = rng.uniform(80, 170, size=(rows, cols))
    hue = np.where(disc, 55.0, -55.0)
    rgb = np.clip(np.rint(grey[..., None] + hue[..., None] * CHROMA), 0, 255).astype(np.uint8)
    return rgb, disc.astype(np.uint8) * 255


def write_colour_dataset(root: Path, n: int = N_CASES) -> Path:
    for i in range(n):
        rgb, mask = colour_frame(i)
        write_image(root / "images" / f"f{i:02d}.png", rgb)
        write_image(root / "masks" / f"f{i:02d}.png", mask)
    return root


def write_grey_dataset(root: Path, n: int = 6) -> Path:
    for i in range(n):
        rgb, mask = colour_frame(i)
        write_image(root / "images" / f"g{i}.png", np.rint(rgb @ LUMA).astype(np.uint8))
        write_image(root / "masks" / f"g{i}.png", mask)
    return root


def colour_cfg(data: Path, tmp_path: Path, **sections):
    """A tiny CPU config on a 2D folder dataset (32 px, 2 epochs of 16 frames)."""
    cfg = {
        "name": "colour",
        "dataset": {"format": "folders2d", "path": str(data), "labels": [1], "window": None, "image_size": 32,
                    "cache_dir": str(tmp_path / "cache"), "split": {"seed": 0, "val_fraction": 0.25}},
        "model": dict(TINY_MODEL),
        "training": {"epochs": 2, "batch_size": 8, "samples_per_epoch": 16, "lr": 0.003, "seed": 0, "threads": 1,
                     "val_overlays": 1},
        "output": {"run_dir": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(cfg.get(section), dict) else values
    return config_from_dict(cfg, source="colour")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("colour"))


@pytest.fixture(scope="module")
def trained(colour_data, tmp_path_factory):
    """A 2-epoch colour run with 2.5D context k=1 (9 input channels): (config, FitResult)."""
    from medseg.training import fit

    work = tmp_path_factory.mktemp("run")
    cfg = colour_cfg(colour_data, work, dataset={"context_slices": 1},
                     augment=[{"name": "HorizontalFlip", "p": 0.5}, {"name": "HueSaturationValue", "p": 0.5}])
    return cfg, fit(cfg, run_dir=work / "run", progress=False)


# ------------------------------------------------------------------------------------------------- reader


def test_the_lesion_is_visible_in_colour_only(colour_data):
    rgb, mask = colour_frame(0)
    luma, on = rgb @ LUMA, mask > 0
    assert abs(luma[on].mean() - luma[~on].mean()) < 0.05 * luma.std()  # grey: the same texture in and out
    assert rgb[on][:, 0].mean() - rgb[~on][:, 0].mean() > 100  # colour: red inside, green outside


def test_auto_reads_colour_in_3_channels_and_gray_keeps_luma(colour_data, tmp_path):
    auto = open_source_from_config(colour_cfg(colour_data, tmp_path).dataset)
    case = auto.load("f00")
    assert auto.channels == 3 and case.image.shape == (64, 64, 1, 3) and case.label.shape == (64, 64, 1)
    rgb, _ = colour_frame(0)
    assert np.array_equal(case.image[:, :, 0], rgb.astype(np.float32))
    gray = open_source_from_config(colour_cfg(colour_data, tmp_path, dataset={"channels": "gray"}).dataset)
    grey_case = gray.load("f00")
    assert gray.channels == 1 and grey_case.image.shape == (64, 64, 1)
    assert np.allclose(grey_case.image[..., 0], rgb.astype(np.float32) @ LUMA.astype(np.float32), atol=1e-3)
    rgb_source = open_source_from_config(colour_cfg(colour_data, tmp_path, dataset={"channels": "rgb"}).dataset)
    assert rgb_source.channels == 3


def test_grey_data_is_one_channel_and_rgb_on_it_or_on_volumes_is_a_config_error(tmp_path):
    grey = write_grey_dataset(tmp_path / "grey")
    assert open_source_from_config(colour_cfg(grey, tmp_path).dataset).channels == 1
    from PIL import Image

    # RGB JPEGs holding grey pictures (equal channels, give or take the compression's chroma noise) are grey too
    for path in (grey / "images").glob("*.png"):
        plane = np.asarray(Image.open(path))
        write_image(tmp_path / "as_rgb" / "images" / f"{path.stem}.jpg", np.repeat(plane[..., None], 3, axis=-1))
        write_image(tmp_path / "as_rgb" / "masks" / path.name, np.asarray(Image.open(grey / "masks" / path.name)))
    assert open_source_from_config(colour_cfg(tmp_path / "as_rgb", tmp_path).dataset).channels == 1
    with pytest.raises(ConfigError) as err:
        _ = open_source_from_config(colour_cfg(grey, tmp_path, dataset={"channels": "rgb"}).dataset).channels
    message = str(err.value)
    assert message.startswith("dataset.channels: rgb, but the images of ") and "greyscale" in message
    assert "\n" not in message and str(grey / "images") in message
    with pytest.raises(ConfigError, match=r"^<config>: dataset\.channels: rgb reads colour 2D images; format 'msd'"):
        config_from_dict({"dataset": {"format": "msd", "channels": "rgb"}})
    msd = make_msd(tmp_path / "msd", {"a": tiny_case(0)})
    with pytest.raises(ConfigError, match=r"^dataset\.channels: rgb reads colour 2D images; .* msd dataset of volumes"):
        open_source("auto", msd, channels="rgb")
    assert open_source("auto", msd, channels="auto").channels == 1


# -------------------------------------------------------------------------------------------------- cache


def test_grey_cache_keeps_its_folder_and_layout_colour_gets_its_own(colour_data, tmp_path):
    grey = write_grey_dataset(tmp_path / "grey")
    for channels in ("auto", "gray"):
        cfg = colour_cfg(grey, tmp_path, dataset={"channels": channels}).dataset
        source = open_source_from_config(cfg)
        # the settings hash as it was before dataset.channels existed
        before = {"version": 2, "modality": "image", "window": None, "percentiles": [0.5, 99.5], "image_size": 32}
        assert prep_dir_for(cfg, source) == dataset_dir_for(cfg, source) / f"prep-{stable_hash(before)}"
    cache = build_cache(cfg, source, progress=False)
    assert cache.channels == 1 and cache.image("g0").shape == (1, 32, 32) and cache.channel_stats(["g0"]) is None
    assert "channels" not in cache.settings and "channel_sums" not in cache.cases["g0"]

    auto_cfg = colour_cfg(colour_data, tmp_path).dataset
    gray_cfg = colour_cfg(colour_data, tmp_path, dataset={"channels": "gray"}).dataset
    colour, luma = (build_cache(c, progress=False) for c in (auto_cfg, gray_cfg))
    assert colour.root != luma.root and colour.root.parent == luma.root.parent  # same data folder, same split
    assert colour.settings["channels"] == 3 and "channels" not in luma.settings
    assert colour.image("f00").shape == (1, 3, 32, 32) and luma.image("f00").shape == (1, 32, 32)
    assert colour.cases["f00"]["orig_shape"] == [64, 64, 1]
    assert CacheEstimate.of_cache(colour).bytes == cache_bytes([1] * N_CASES, 32, channels=3)  # what --estimate says
    image = np.asarray(colour.image("f00"), np.float32)
    assert 0 <= image.min() and image.max() <= 1
    small = np.asarray(colour.label("f00"))[0] > 0
    assert image[0, 0][small].mean() > image[0, 0][~small].mean() + 0.2  # red channel: the lesion is brighter


def test_channel_stats_are_the_training_cases_pixels_only(colour_data, tmp_path):
    from medseg.training import prepare_data

    data = tmp_path / "data"
    write_colour_dataset(data)
    cfg = colour_cfg(data, tmp_path)
    prepared = prepare_data(cfg, progress=False)
    train, val = prepared.split.train, prepared.split.val
    assert train and val and prepared.in_channels == 3
    pixels = np.stack([np.asarray(prepared.cache.image(c), np.float64)[0] for c in train])  # (N, 3, S, S)
    stats = prepared.channel_stats
    assert np.allclose(stats["mean"], pixels.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(stats["std"], pixels.std(axis=(0, 2, 3)), atol=1e-6)
    assert prepared.preprocessing(cfg)["channel_mean"] == stats["mean"]

    def stats_after_rewriting(case_id: str) -> dict:
        rgb, mask = colour_frame(100 + int(case_id[1:]))
        write_image(data / "images" / f"{case_id}.png", rgb[..., ::-1].copy())  # other colours, same mask
        again = prepare_data(cfg, progress=False)
        assert again.split.train == train and again.cache.root != prepared.cache.root  # rebuilt, same split
        return again.channel_stats

    assert stats_after_rewriting(val[0]) == stats  # a validation image does not enter
    assert stats_after_rewriting(train[0]) != stats  # a training image does


# ----------------------------------------------------------------------------------------- train, infer, eval


def test_colour_checkpoint_has_3_channels_per_slice_and_its_statistics(trained):
    import torch

    from medseg.checkpoint import load_checkpoint, model_from_checkpoint
    from medseg.models import Standardised

    cfg, result = trained
    meta = load_checkpoint(result.best_checkpoint)["meta"]
    assert meta["in_channels"] == 3 * (2 * 1 + 1)
    prep = meta["preprocessing"]
    assert prep["channels"] == 3 and len(prep["channel_mean"]) == len(prep["channel_std"]) == 3
    model, _, _ = model_from_checkpoint(result.best_checkpoint)
    assert isinstance(model, Standardised)
    assert torch.allclose(model.mean.flatten(), torch.tensor(prep["channel_mean"] * 3))
    assert torch.allclose(model.std.flatten(), torch.tensor(prep["channel_std"] * 3))
    overlay = next((result.run_dir / "overlays").glob("*.png"))
    from PIL import Image

    pixels = np.asarray(Image.open(overlay).convert("RGB"), np.int16)
    assert (np.abs(pixels[..., 0] - pixels[..., 1]) > 30).mean() > 0.1  # the colour frame, not a grey one


def test_a_colour_model_finds_the_lesion_a_grey_one_cannot_see(tmp_path):
    """8 short epochs on 24 frames at 32 px: 0.76 validation Dice in colour, 0.13 (epoch 1, then 0) in grey."""
    from medseg.training import fit

    data = write_colour_dataset(tmp_path / "data", n=24)
    best = {}
    for channels in ("auto", "gray"):
        cfg = colour_cfg(data, tmp_path, dataset={"channels": channels},
                         training={"epochs": 8, "samples_per_epoch": 48, "batch_size": 16, "val_overlays": 0},
                         augment=[{"name": "HorizontalFlip", "p": 0.5}])
        best[channels] = fit(cfg, run_dir=tmp_path / channels, progress=False).best_metrics["val/dice"]
    assert best["auto"] > 0.5 and best["gray"] < 0.3, best


def test_infer_writes_a_mask_of_the_input_size_and_refuses_a_grey_image(trained, tmp_path):
    from PIL import Image

    from medseg.inference import run_inference

    _, result = trained
    rgb, _ = colour_frame(7, size=(80, 72))
    image = write_image(tmp_path / "in" / "frame.jpg", rgb)
    records = run_inference(result.best_checkpoint, image, tmp_path / "out", overlays=True)
    mask = Image.open(records[0]["mask"])
    assert mask.size == (72, 80) and mask.mode == "L" and records[0]["shape"] == [80, 72, 1]
    assert set(np.unique(np.asarray(mask))) <= {0, 255}

    grey = write_image(tmp_path / "grey" / "g1.png", np.rint(rgb @ LUMA).astype(np.uint8))
    with pytest.raises(DataError) as err:
        run_inference(result.best_checkpoint, grey, tmp_path / "out2")
    message = str(err.value)
    assert message.startswith(f"{grey} (case g1): the image has 1 channel, the checkpoint ")
    assert "expects 3 (dataset.channels: rgb): give it the colour image" in message and "\n" not in message
    assert not (tmp_path / "out2" / "g1_mask.png").exists()
    # the command line: one line on stderr, exit 1
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--ckpt", str(result.best_checkpoint), "--input",
                           str(grey), "--out", str(tmp_path / "out3")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {message}"


def test_eval_robustness_and_export_overlays_on_a_colour_checkpoint(trained, tmp_path):
    from medseg.evaluation import evaluate_checkpoint
    from medseg.export import write_overlays
    from medseg.robustness import PERTURBATIONS, evaluate_robustness, perturb_volume, strongest
    from medseg.training import prepare_data

    cfg, result = trained
    data = prepare_data(cfg, progress=False)
    evaluated = evaluate_checkpoint(result.best_checkpoint, cfg, data=data, progress=False, flip_tta=True)
    assert [r["case_id"] for r in evaluated.rows] == data.split.val
    volume = np.random.default_rng(0).uniform(size=(2, 3, 32, 32)).astype(np.float32)
    noisy = perturb_volume(volume, PERTURBATIONS["gaussian_noise"]["0.12"], seed=0)
    assert noisy.shape == volume.shape and not np.array_equal(noisy, volume)
    robust = evaluate_robustness(result.best_checkpoint, cfg, table=strongest(PERTURBATIONS), data=data,
                                 progress=False)
    assert {r["perturbation"] for r in robust["rows"]} >= {"clean", "gaussian_noise", "downsample"}
    paths = write_overlays(result.best_checkpoint, data, data.split.val[:1],
                           {r["case_id"]: r for r in evaluated.rows}, tmp_path / "overlays")
    assert paths and paths[0].is_file()
    # the same checkpoint given the grey reading of its data: one line naming the frame and its case
    grey_cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"channels": "gray"})})
    with pytest.raises(DataError, match=r"\(case f\d\d\): the image has 1 channel, the checkpoint .* expects 3"):
        evaluate_checkpoint(result.best_checkpoint, grey_cfg, progress=False)


def test_colour_masks_stop_with_one_line_naming_file_and_case(tmp_path):
    from medseg.evaluation import evaluate_predictions

    data = write_colour_dataset(tmp_path / "data", n=4)
    rgb, mask = colour_frame(2)
    painted = np.zeros((*mask.shape, 3), np.uint8)
    painted[mask > 0] = (255, 0, 0)
    write_image(data / "masks" / "f02.png", painted)
    with pytest.raises(BadLabelError) as err:
        build_cache(colour_cfg(data, tmp_path).dataset, progress=False)
    message = str(err.value)
    assert message.startswith(f"{data / 'masks' / 'f02.png'} (case f02): colour mask") and "\n" not in message
    preds = tmp_path / "preds"
    write_image(preds / "f01.png", painted)
    source = open_source_from_config(colour_cfg(data, tmp_path).dataset)
    with pytest.raises(BadLabelError, match=r"preds/f01\.png \(case f01\): colour mask"):
        evaluate_predictions(source, preds, case_ids=["f01"], progress=False)


def test_an_unreadable_image_is_its_own_cases_error_not_the_colour_decisions(tmp_path):
    from medseg.data import check

    data = write_colour_dataset(tmp_path / "data", n=4)
    (data / "images" / "f00.png").write_bytes(b"not a png")
    cfg = colour_cfg(data, tmp_path).dataset
    assert open_source_from_config(cfg).channels == 3  # decided on the readable frames
    report = check.audit(cfg, slices=False)
    assert [(e["kind"], e["case"]) for e in report["errors"]] == [("corrupt_file", "f00")], report["errors"]


# ------------------------------------------------------------------------------------------------- real data


def test_cvc_clinicdb_frames_are_colour_for_auto(tmp_path):
    if not CVC_DIR.is_dir():
        pytest.skip(f"CVC-ClinicDB not found at {CVC_DIR} (check out ../shared beside the repo)")
    from tests.test_real_2d import dataset_cfg

    auto = open_source_from_config(dataset_cfg(tmp_path / "cache", **{"dataset.channels": "auto"}))
    case = auto.load("1")
    assert auto.channels == 3 and case.image.shape == (256, 256, 1, 3) and case.label.shape == (256, 256, 1)
    spread = case.image.max(axis=-1) - case.image.min(axis=-1)
    assert np.median(spread) > 20  # real colour: mucosa is red, not grey
    grey = open_source_from_config(dataset_cfg(tmp_path / "cache"))  # the config's own channels: gray
    assert grey.channels == 1
    luma = case.image[:, :, 0] @ LUMA.astype(np.float32)
    assert np.allclose(grey.load("1").image[..., 0], luma, atol=1e-3)
