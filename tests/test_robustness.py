"""Robustness set (eval.py --robustness, medseg/robustness.py): valid specs, identity = clean, determinism, strong
noise hurts a trained model, the CLI's JSON and MLflow metrics, the study report's section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.robustness import (
    PERTURBATIONS,
    WINDOW_SHIFT,
    build_transform,
    evaluate_robustness,
    perturb_volume,
    robustness_markdown,
    strongest,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(synth_root, shared_cache, tmp_path_factory):
    """(config, checkpoint, data) of a tiny model trained 2 epochs, shared by this module's tests."""
    import importlib.util

    from medseg.config import config_from_dict
    from medseg.training import fit, prepare_data

    spec = importlib.util.spec_from_file_location("_robust_conftest", Path(__file__).with_name("conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tiny_config_dict = conftest.tiny_config_dict
    work = tmp_path_factory.mktemp("robust")
    cfg = config_from_dict(tiny_config_dict(synth_root, shared_cache, work, training={"epochs": 2, "val_overlays": 0}),
                           source="tiny")
    ckpt = fit(cfg, run_dir=work / "run", progress=False).best_checkpoint
    return cfg, ckpt, prepare_data(cfg, progress=False)


def _rows(summary):
    return json.dumps([{k: v for k, v in r.items()} for r in summary["rows"]], default=str, sort_keys=True)


def test_specs_build_valid_albumentations_transforms():
    import albumentations as A

    volume = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    for name, severities in PERTURBATIONS.items():
        assert severities, name
        for severity, spec in severities.items():
            float(severity)  # severity labels are numbers (MLflow metric names robust/<name>_<severity>/...)
            if name == WINDOW_SHIFT:
                assert set(spec) == {"level_shift"}
                continue
            transform = build_transform(spec)
            assert isinstance(transform, A.BasicTransform) and transform.p == 1.0
            for key, value in spec["args"].items():  # a severity is one value: equal low/high limits
                if isinstance(value, tuple):
                    assert value[0] == value[1], (name, severity, key)
            out = perturb_volume(volume, spec, seed=1)
            assert out.shape == volume.shape and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
            assert not np.array_equal(out, volume), (name, severity)
            assert np.array_equal(out, perturb_volume(volume, spec, seed=1))
    assert strongest(PERTURBATIONS)["gaussian_noise"] == {"0.12": PERTURBATIONS["gaussian_noise"]["0.12"]}


def test_identity_scores_exactly_clean_and_runs_are_deterministic(trained):
    from medseg.evaluation import evaluate_checkpoint

    cfg, ckpt, data = trained
    identity = {"brightness": {"0": {"transform": "RandomBrightnessContrast",
                                     "args": {"brightness_limit": (0.0, 0.0), "contrast_limit": (0.0, 0.0)}}},
                "gaussian_noise": {"0": {"transform": "GaussNoise",
                                         "args": {"std_range": (0.0, 0.0), "mean_range": (0.0, 0.0)}}},
                WINDOW_SHIFT: {"0": {"level_shift": 0.0}}}
    summary = evaluate_robustness(ckpt, cfg, table=identity, data=data, progress=False)
    clean = evaluate_checkpoint(ckpt, cfg, data=data, progress=False).summary
    assert [r["perturbation"] for r in summary["rows"]] == ["clean", "brightness", "gaussian_noise", WINDOW_SHIFT]
    for row in summary["rows"]:
        assert row["dice"] == clean["dice"] and row["dice_drop"] == 0.0
        assert row["lesion_recall"] == clean["lesion_recall"] and row["lesion_precision"] == clean["lesion_precision"]

    table = {"gaussian_noise": {"0.12": PERTURBATIONS["gaussian_noise"]["0.12"]},
             "downsample": PERTURBATIONS["downsample"]}
    first = evaluate_robustness(ckpt, cfg, table=table, data=data, progress=False)
    assert _rows(first) == _rows(evaluate_robustness(ckpt, cfg, table=table, data=data, progress=False))


def test_strong_noise_lowers_dice(trained):
    cfg, ckpt, data = trained
    noise = {"gaussian_noise": {"0.5": {"transform": "GaussNoise",
                                        "args": {"std_range": (0.5, 0.5), "mean_range": (0.0, 0.0)}}}}
    summary = evaluate_robustness(ckpt, cfg, table=noise, data=data, progress=False)
    clean, noisy = summary["rows"]
    assert clean["dice"] > 0  # there is Dice to lose (2 tiny epochs: little, but seeded, so the same every run)
    assert noisy["dice"] < clean["dice"] and summary["worst_drop"] == noisy["dice_drop"] > 0
    assert summary["worst"] == "gaussian_noise_0.5"


def test_cli_writes_json_and_logs_mlflow_metrics(trained, tmp_path):
    from medseg.tracking import get_client

    cfg, ckpt, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(ckpt), "--robustness",
                           "--out", str(out), "--set", f"output.tracking_uri={uri}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "robustness.json").read_text())
    n_rows = 1 + sum(len(s) for s in PERTURBATIONS.values())
    assert len(saved["rows"]) == n_rows and saved["rows"][0]["perturbation"] == "clean"
    assert "worst Dice drop" in proc.stdout and "gaussian_noise  0.12" in proc.stdout
    client = get_client(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("kind") == "eval"]
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["robust/worst_drop"] == pytest.approx(saved["worst_drop"])
    assert metrics["robust/gaussian_noise_0.12/dice"] == pytest.approx(saved["rows"][3]["dice"])
    assert metrics["eval/dice"] == pytest.approx(saved["clean_dice"])
    assert "eval/robustness.json" in [a.path for a in client.list_artifacts(runs[0].info.run_id, "eval")]


def test_study_report_shows_robustness_only_when_given(tmp_path):
    from medseg.report import write_study_report
    from medseg.search_space import load_space
    from medseg.tuning import StudyOutcome

    trial = {"trial_id": "t1", "params": {}, "status": "completed", "best_value": 0.5, "best_dice": 0.5,
             "best_iou": 0.4, "best_epoch": 1, "epochs_used": 1, "epochs_planned": 1, "history": [], "error": None,
             "checkpoint": "x"}
    outcome = StudyOutcome(name="s", study_dir=tmp_path, parent_run_id="p", experiment_id="1",
                           tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", trials=[trial], best=trial)
    space = load_space(ROOT / "search_spaces" / "smoke.yaml")
    plain = write_study_report(outcome, space, None, out_dir=tmp_path / "a")
    assert "Robustness" not in Path(plain["markdown"]).read_text()
    summary = {"n_cases": 2, "clean_dice": 0.5, "worst_drop": 0.2, "worst": "gaussian_noise_0.12",
               "rows": [{"perturbation": "clean", "severity": "-", "dice": 0.5, "dice_drop": 0.0, "lesion_recall": 1.0,
                         "lesion_precision": float("nan")},
                        {"perturbation": "gaussian_noise", "severity": "0.12", "dice": 0.3, "dice_drop": 0.2,
                         "lesion_recall": 0.5, "lesion_precision": 1.0}]}
    paths = write_study_report(outcome, space, None, out_dir=tmp_path / "b", robustness=summary)
    text = Path(paths["markdown"]).read_text()
    assert "\n".join(robustness_markdown(summary)) in text
    assert "| gaussian_noise | 0.12 | 0.3000 | 0.2000 | 0.5000 | 1.0000 |" in text
    assert json.loads(Path(paths["json"]).read_text())["robustness"]["worst"] == "gaussian_noise_0.12"
