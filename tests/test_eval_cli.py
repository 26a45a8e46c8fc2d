"""eval.py without --config: Kaggle-layout predictions, --data, a checkpoint's own config; checkpoints that no longer
match the code's format are one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.checkpoint import VERSION, checkpoint_config, load_checkpoint, model_from_checkpoint, save_checkpoint
from medseg.config import Config
from medseg.errors import CheckpointError, ConfigError, DataError
from medseg.evaluation import eval_config, evaluate_predictions, format_table, kaggle_task_of, run_eval_cli
from tests.conftest import TINY_MODEL
from tests.fixtures import evalseg_dir, expected, make_msd, tiny_case

ROOT = Path(__file__).resolve().parents[1]


def run_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """eval.py as a user runs it, never touching the default MLflow store."""
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"})


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``error: ...`` line run_cli prints (exit code 2 usage/config, 1 a failed job; no traceback)."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ predictions folders


def test_table_of_dict_rows_has_floats_to_four_decimals_and_no_trailing_spaces():
    rows = [{"method": "a", "dice": 0.5, "n": 3}, {"method": "long name", "dice": float("nan")}]
    assert format_table(rows, ["method", "dice", "n"]).splitlines() == [
        "method     dice    n", "a          0.5000  3", "long name  nan"]
    assert format_table([], ["rank", "method"]) == "rank  method"


def test_kaggle_layout_predictions_need_no_config(tmp_path):
    task = evalseg_dir() / "TaskA_Example"
    proc = run_eval("--predictions", str(task / "Predictions" / "p1"), "--no-mlflow", "--out", str(tmp_path / "out"),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("p1: {")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert round(summary["summary"]["dice"], 4) == expected()["reference_methods"]["TaskA_Example/p1"]["mean_case_dice"]
    assert summary["dataset"] == str(task.resolve())


def test_config_built_for_the_task_of_a_kaggle_predictions_folder():
    """Task001: the config names the root, the task folder and the metadata's labels; its scores are the reference's."""
    root = evalseg_dir()
    pred_dir = root / "Task001_LiverTumor" / "Predictions" / "Dice"
    assert kaggle_task_of(pred_dir) == (root / "Task001_LiverTumor").resolve()
    cfg = eval_config(predictions=pred_dir)
    assert (cfg.dataset.format, cfg.dataset.path, cfg.dataset.task, cfg.dataset.labels) == (
        "kaggle", str(root.resolve()), "Task001_LiverTumor", [1])
    # a few cases (the whole task, 87 large volumes, is test_eval_infer's reference test)
    from medseg.data.sources import open_source_from_config

    ref = expected()["reference_methods"]["Task001_LiverTumor/Dice"]["per_case_dice"]
    cases = ["101", "13", "240"]
    result = evaluate_predictions(open_source_from_config(cfg.dataset), pred_dir, labels=cfg.dataset.labels,
                                  case_ids=cases, progress=False, lesions=False)
    assert result.per_case_dice() == pytest.approx({c: ref[c] for c in cases}, abs=1e-6)


def test_predictions_elsewhere_are_scored_against_data(tmp_path):
    task = evalseg_dir() / "TaskA_Example"
    preds = shutil.copytree(task / "Predictions" / "p2", tmp_path / "my_preds")
    with pytest.raises(ConfigError, match=r"--predictions .*my_preds: not in a Kaggle layout .* "
                                          r"pass --data DATASET_DIR or --config CONFIG"):
        eval_config(predictions=preds)
    cfg = eval_config(predictions=preds, data=task, overrides=["output.experiment=mine"])
    assert (cfg.dataset.task, cfg.output.experiment) == ("TaskA_Example", "mine")
    text = run_eval_cli(cfg, predictions=preds, out=tmp_path / "out", mlflow=False)
    assert text.startswith("my_preds: ")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert round(summary["summary"]["dice"], 4) == expected()["reference_methods"]["TaskA_Example/p2"]["mean_case_dice"]
    # a Kaggle root holding several tasks is ambiguous; --data and --config together too
    with pytest.raises(DataError, match="holds several tasks .*pass --data <its task folder>"):
        eval_config(predictions=preds, data=evalseg_dir())
    with pytest.raises(ConfigError, match="give --config or --data, not both"):
        eval_config(config=tmp_path / "c.yaml", predictions=preds, data=task)


def test_data_may_be_any_supported_dataset_folder(tmp_path):
    """An MSD folder: format detected, labels from its dataset.json, NIfTI predictions scored."""
    cases = {cid: tiny_case(seed) for seed, cid in enumerate(["a1", "a2"])}
    msd = make_msd(tmp_path / "Task09_Tiny", cases)
    preds = shutil.copytree(msd / "labelsTr", tmp_path / "preds")  # the truth itself
    cfg = eval_config(predictions=preds, data=msd)
    assert (cfg.dataset.format, cfg.dataset.path, cfg.dataset.task, cfg.dataset.labels) == (
        "msd", str(msd.resolve()), None, [1])
    run_eval_cli(cfg, predictions=preds, out=tmp_path / "out", mlflow=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    assert (summary["n_scored"], summary["dice"]) == (2, 1.0)


def test_no_config_no_layout_no_data_is_a_one_line_error(tmp_path):
    preds = shutil.copytree(evalseg_dir() / "TaskA_Example" / "Predictions" / "p1", tmp_path / "preds")
    line = one_line_error(run_eval("--predictions", str(preds), "--no-mlflow", cwd=tmp_path))
    assert str(preds) in line and "pass --data DATASET_DIR or --config CONFIG" in line
    line = one_line_error(run_eval("--predictions", str(tmp_path / "nowhere"), "--no-mlflow", cwd=tmp_path), 1)
    assert line == f"error: {tmp_path / 'nowhere'}: predictions folder not found"


# ------------------------------------------------------------------------------------------ checkpoints


def tiny_checkpoint(path: Path, config: dict | None = None, **meta) -> Path:
    """A real medseg checkpoint of the tests' tiny UNet, with ``config`` (default: a valid one) as its stored config."""
    from medseg.models import build_model

    cfg = Config.model_validate({"model": TINY_MODEL})
    model = build_model(cfg.model, in_channels=1, classes=1)
    return save_checkpoint(path, model, {"config": config if config is not None else cfg.to_dict(), "in_channels": 1,
                                         "classes": 1, "versions": {"medseg": "0.0.1"}, **meta})


def test_checkpoint_of_another_format_version_is_a_one_line_error(tmp_path):
    good = tiny_checkpoint(tmp_path / "good.pt")
    payload = torch.load(good, weights_only=True)
    payload["version"] = VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=rf"future\.pt: unsupported checkpoint format version {VERSION + 1} "
                                              rf"\(this medseg reads version {VERSION}, written by medseg 0\.0\.1\)"):
        load_checkpoint(tmp_path / "future.pt")
    line = one_line_error(run_eval("--ckpt", str(tmp_path / "future.pt"), "--no-mlflow", cwd=tmp_path), 1)
    assert line.startswith(f"error: {tmp_path / 'future.pt'}: unsupported checkpoint format version {VERSION + 1}")


def test_checkpoint_whose_stored_config_no_longer_validates_is_a_one_line_error(tmp_path):
    stale = Config.model_validate({"model": TINY_MODEL}).to_dict()
    stale["training"]["warmup"] = 3  # a key this code does not know (renamed or removed since)
    path = tiny_checkpoint(tmp_path / "stale.pt", config=stale)
    message = (rf"stale\.pt: its stored config no longer validates against this medseg \(checkpoint format version "
               rf"{VERSION}, this medseg reads version {VERSION}, written by medseg 0\.0\.1; .*\): config: "
               rf"training\.warmup: unknown key")
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        eval_config(ckpt=path)
    line = one_line_error(run_eval("--ckpt", str(path), "--no-mlflow", cwd=tmp_path), 1)
    assert str(path) in line and f"checkpoint format version {VERSION}" in line
    assert "training.warmup: unknown key" in line
    # no stored config at all
    bare = save_checkpoint(tmp_path / "bare.pt", torch.nn.Linear(1, 1), {"in_channels": 1, "classes": 1})
    with pytest.raises(CheckpointError, match=rf"bare\.pt: no stored config .*checkpoint format version {VERSION}"):
        checkpoint_config(bare)


def test_checkpoint_without_config_uses_its_stored_config(tiny_cfg, tmp_path):
    from medseg.training import fit

    cfg = tiny_cfg(training={"epochs": 1})
    result = fit(cfg, run_dir=tmp_path / "run", progress=False)
    stored = eval_config(ckpt=result.best_checkpoint)
    assert stored.to_dict() == cfg.to_dict()
    assert eval_config(ckpt=result.best_checkpoint, overrides=["training.threshold=0.3"]).training.threshold == 0.3
    proc = run_eval("--ckpt", str(result.best_checkpoint), "--no-mlflow", "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    # eval.py applies the post-processing chosen on validation: the Dice it reached there (none chosen: unchanged)
    assert summary["summary"]["dice"] == pytest.approx(result.postprocessing["dice_after"], abs=1e-9)
    assert result.postprocessing["dice_before"] == result.best_metrics["val/dice"]
    with pytest.raises(ConfigError, match="--data applies to --predictions only"):
        eval_config(ckpt=result.best_checkpoint, data=tmp_path)
