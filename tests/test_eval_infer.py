"""eval.py and infer.py: reference Dice of the real dataset, checkpoint evaluation, leaderboard, geometry of masks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medseg.data.sources import open_source
from medseg.errors import MedsegError
from medseg.evaluation import evaluate_checkpoint, evaluate_predictions, leaderboard
from medseg.inference import Predictor, predict_volume, run_inference, slice_logits
from medseg.models import predict_classes
from medseg.training import fit, prepare_data
from medseg.tta import mirrored_logits
from tests.fixtures import evalseg_dir, expected

ROOT = Path(__file__).resolve().parents[1]


def test_predict_classes_from_logits_and_from_probabilities():
    # one channel: foreground where the probability is above the threshold (strictly)
    logits = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    assert predict_classes(logits).tolist() == [[[0, 0, 1]]]
    probs = torch.tensor([0.3, 0.5, 0.7]).reshape(1, 1, 1, 3)
    assert predict_classes(probs, 0.5, probabilities=True).tolist() == [[[0, 0, 1]]]
    assert predict_classes(probs, 0.25, probabilities=True).tolist() == [[[1, 1, 1]]]
    # several channels: the argmax, of logits or of probabilities alike
    scores = torch.tensor([[0.2, 0.5], [0.7, 0.1], [0.1, 0.4]]).reshape(1, 3, 1, 2)
    assert predict_classes(scores).tolist() == [[[1, 0]]]
    assert predict_classes(scores, probabilities=True).tolist() == [[[1, 0]]]


def test_slice_logits_batches_every_slice_once_in_order():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, 3, padding=1)  # context 1: a slice and its two neighbours
    volume = np.random.default_rng(0).random((7, 8, 8), dtype=np.float32)
    batches = list(slice_logits(model, volume, context=1, device=torch.device("cpu"), batch_size=3))
    assert [zs for zs, _ in batches] == [range(0, 3), range(3, 6), range(6, 7)]
    assert [tuple(logits.shape) for _, logits in batches] == [(3, 1, 8, 8), (3, 1, 8, 8), (1, 1, 8, 8)]
    pred, loss = predict_volume(model, volume, context=1, device=torch.device("cpu"), batch_size=3, threshold=0.4)
    expected_pred = np.concatenate([predict_classes(logits, 0.4).numpy() for _, logits in batches])
    assert loss is None and np.array_equal(pred, expected_pred)
    # with mirrors: the mirrored average of each batch
    mirrored = list(slice_logits(model, volume, context=1, device=torch.device("cpu"), batch_size=3, tta_axes=[[3]]))
    zs, logits = mirrored[1]
    x = torch.from_numpy(np.stack([volume[z - 1:z + 2] for z in zs]))
    with torch.no_grad():
        assert torch.equal(logits, mirrored_logits(model, x, model(x), [[3]]))


@pytest.mark.parametrize("method", ["TaskA_Example/p1", "TaskA_Example/Alg2", "Task001_LiverTumor/Dice",
                                    pytest.param("Task001_LiverTumor/CE", marks=pytest.mark.slow)])  # ~50 s each
def test_scoring_reference_predictions_reproduces_expected_dice(method):
    ref = expected()["reference_methods"][method]
    task, name = method.split("/")  # TaskA_Example holds ground truth for 4 cases, each method predicts 2 of them
    source = open_source("kaggle", evalseg_dir() / task)
    # lesion detection off: Dice is what expected.json holds, and labelling 87 large volumes takes minutes
    result = evaluate_predictions(source, evalseg_dir() / task / "Predictions" / name, progress=False, lesions=False)
    assert result.summary["n_cases"] == ref["cases"] and result.summary["n_scored"] == ref["cases_scored"]
    assert round(result.summary["dice"], 4) == ref["mean_case_dice"]
    for case_id, dice in ref["per_case_dice"].items():
        got = result.per_case_dice()[case_id]
        assert (dice is None and np.isnan(got)) or got == pytest.approx(dice, abs=1e-6), case_id


def test_eval_cli_on_a_predictions_folder(tmp_path):
    task = evalseg_dir() / "TaskA_Example"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "c", "dataset": {"path": str(task), "labels": [1]}}))
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--config", str(cfg),
                           "--predictions", str(task / "Predictions" / "p1"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert round(summary["summary"]["dice"], 4) == expected()["reference_methods"]["TaskA_Example/p1"]["mean_case_dice"]
    assert (tmp_path / "out" / "per_case.csv").read_text().startswith("case_id,dice,iou")
    assert summary["missing"] == ["101", "108"]  # ground truth without a prediction: listed, not scored
    assert "2 ground-truth case(s) have no prediction and are not scored: 101, 108" in proc.stderr
    # when the cases are given (here: scored as empty), missing ones count as empty masks: Dice 0
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--config", str(cfg),
                           "--predictions", str(task / "Predictions" / "p1"), "--missing-as-empty",
                           "--out", str(tmp_path / "out2")], capture_output=True, text=True, cwd=tmp_path)
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["summary"]["n_cases"] == 4 and summary["summary"]["dice"] == pytest.approx(0.8223 / 2, abs=1e-4)


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"epochs": 2})
    result = fit(cfg, run_dir=tmp_path / "run", progress=False)
    return cfg, result


def test_checkpoint_evaluation_full_resolution_matches_training_validation(trained):
    cfg, result = trained
    ev = evaluate_checkpoint(result.best_checkpoint, cfg, split="val", progress=False)
    # the synthetic volumes are 64 px like the cache, so full-resolution scores equal the training-time ones (with the
    # post-processing chosen on them after training, which eval applies; without it, the training-time Dice itself)
    assert ev.summary["dice"] == pytest.approx(result.postprocessing["dice_after"], abs=1e-9)
    raw = evaluate_checkpoint(result.best_checkpoint, cfg, split="val", progress=False, postprocess=False)
    assert raw.summary["dice"] == pytest.approx(result.best_metrics["val/dice"], abs=1e-9)
    assert sorted(ev.per_case_dice()) == sorted(prepare_data(cfg, progress=False).split.val)
    tta = evaluate_checkpoint(result.best_checkpoint, cfg, split="val", flip_tta=True, progress=False)
    assert tta.info["flip_tta"] and 0 <= tta.summary["dice"] <= 1


def test_eval_reads_the_cached_slices_and_predicts_what_decoding_would(trained):
    """eval.py decodes only the ground truth when the cache holds the images as the checkpoint preprocesses them: the
    masks equal those of the decoded images, case by case; a cache of other settings is not used."""
    cfg, result = trained
    data = prepare_data(cfg, progress=False)
    predictor = Predictor(result.best_checkpoint)
    assert predictor.reads_cache(data.cache)
    for cid in data.split.val:
        case = data.source.load(cid)
        planes = data.cache.image(cid)
        np.testing.assert_array_equal(np.asarray(planes, np.float32), predictor.preprocess(case.image))
        np.testing.assert_array_equal(predictor.predict_planes(planes, case.label.shape), predictor.predict(case.image))
    assert evaluate_checkpoint(result.best_checkpoint, cfg, progress=False).info["images_from"] == "slice cache"
    other = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"percentiles": (1.0, 99.0)})})
    other_data = prepare_data(other, progress=False)
    assert not predictor.reads_cache(other_data.cache)
    ev = evaluate_checkpoint(result.best_checkpoint, other, progress=False, data=other_data)
    assert ev.info["images_from"] == "decoded"
    assert ev.summary["dice"] == pytest.approx(result.postprocessing["dice_after"], abs=1e-9)


def test_checkpoint_is_refused_on_another_split(trained, tiny_cfg):
    _, result = trained
    other = tiny_cfg(dataset={"split": {"seed": 7, "val_fraction": 0.25}})
    with pytest.raises(MedsegError, match="trained with split .* scoring there may include its training cases"):
        evaluate_checkpoint(result.best_checkpoint, other, progress=False)


def test_leaderboard_ranks_checkpoint_among_reference_methods(trained, tmp_path):
    cfg, result = trained
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    data = prepare_data(cfg, progress=False)
    perturbed = Path(data.source.root) / "Predictions" / "perturbed"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--config", str(cfg_path),
                           "--ckpt", str(result.best_checkpoint), "--predictions", str(perturbed), "--leaderboard",
                           "--out", str(tmp_path / "ev")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # --ckpt and --predictions with one --out: each keeps its own tables
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["name"] == str(result.best_checkpoint)
    assert json.loads((tmp_path / "ev" / "eval-perturbed" / "summary.json").read_text())["name"] == "perturbed"
    table = proc.stdout.split("leaderboard on", 1)[1].splitlines()[2:]
    methods = {line.split()[1] for line in table}
    assert {"threshold", "perturbed", str(result.best_checkpoint)} <= methods
    # ranks follow the Dice column
    dices = [float(line.split()[2]) for line in table]
    assert dices == sorted(dices, reverse=True)
    # and the scores are the ones evaluate_predictions gives on the same validation cases
    ref = evaluate_predictions(data.source, Path(data.source.root) / "Predictions" / "perturbed",
                               case_ids=data.split.val, progress=False)
    row = leaderboard([ref])[0]
    assert any(line.split()[1] == "perturbed" and float(line.split()[2]) == pytest.approx(row["dice"], abs=1e-4)
               for line in table)


def test_infer_keeps_nifti_geometry_and_image_size(trained, tmp_path):
    cfg, result = trained
    data = prepare_data(cfg, progress=False)
    case = data.source.load(data.split.val[0])
    # a NIfTI with a non-trivial affine and a different in-plane size than the model's input (64 px)
    affine = np.array([[0.7, 0, 0, -10], [0, 0.7, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    image = np.repeat(np.repeat(case.image, 2, axis=0), 2, axis=1)[:100, :90]
    ct = nib.Nifti1Image(image.astype(np.int16), affine)
    ct.header["cal_min"], ct.header["cal_max"] = -100, 300  # the CT's display range must not reach the mask
    nib.save(ct, tmp_path / "vol.nii.gz")
    Image.fromarray(np.clip(case.image[:, :, 0] + 1000, 0, 255).astype(np.uint8)).save(tmp_path / "slice.png")
    records = run_inference(result.best_checkpoint, tmp_path / "vol.nii.gz", tmp_path / "out", device="cpu")
    mask = nib.load(records[0]["mask"])
    assert mask.shape == (100, 90, image.shape[2]) and np.allclose(mask.affine, affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert mask.get_data_dtype() == np.uint8 and (mask.header["cal_min"], mask.header["cal_max"]) == (0, 0)
    assert Path(records[0]["overlay"]).exists()
    records = run_inference(result.best_checkpoint, tmp_path / "slice.png", tmp_path / "out", device="cpu")
    assert Image.open(records[0]["mask"]).size == (64, 64)
    # a case of a Kaggle task through the CLI, written with the CT's geometry
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--ckpt", str(result.best_checkpoint),
                           "--input", str(data.source.root), "--case", case.case_id, "--out", str(tmp_path / "k")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = nib.load(tmp_path / "k" / f"{case.case_id}.nii.gz")
    assert out.shape == case.image.shape and np.allclose(out.affine, case.affine)
    # same prediction as the evaluation path
    predicted = Predictor(result.best_checkpoint, device="cpu").predict(case.image)
    if not torch.cuda.is_available():  # asking for a GPU that is not there: one line, not a torch traceback
        with pytest.raises(MedsegError, match="--device cuda: no CUDA device is available"):
            Predictor(result.best_checkpoint, device="cuda")
    assert np.array_equal(np.asarray(out.dataobj), predicted)


def test_eval_output_never_lands_inside_a_registered_version(tmp_path, monkeypatch):
    from medseg.evaluation import default_eval_dir

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r1"
    version = tmp_path / "models" / "versions" / "medseg-v3"
    for folder in (run, version):
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(b"x")
    (version / "MODEL_CARD.md").write_text("card")
    (tmp_path / "models" / "champion").symlink_to(version)
    assert default_eval_dir(run / "checkpoint.pt", "val", False) == run / "eval-val"
    # through the champion link or directly, a registered version stays as registered
    for ckpt in (tmp_path / "models" / "champion" / "checkpoint.pt", version / "checkpoint.pt"):
        assert default_eval_dir(ckpt, "val", True) == tmp_path / "eval" / "medseg-v3-val-tta"
