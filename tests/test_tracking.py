"""train.py's MLflow tracking on a real sqlite store: params, per-epoch metrics, tags, artifacts, statuses."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg.config import flatten
from medseg.errors import NonFiniteLossError
from medseg.tracking import get_client, tracking_uri, train_tracked
from tests.fixtures import wait_while_running

ROOT = Path(__file__).resolve().parents[1]


def test_train_run_is_fully_tracked(tiny_cfg):
    cfg = tiny_cfg(training={"epochs": 2})
    result, run_id = train_tracked(cfg, progress=False)
    client = get_client(tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    flat = {k: str(v) for k, v in flatten(cfg.to_dict()).items()}
    assert run.data.params == flat  # the whole resolved config, flattened
    for key in ("val/dice", "val/iou", "train/loss", "val/loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == [1, 2], key
    dice_history = [m.value for m in client.get_metric_history(run_id, "val/dice")]
    assert dice_history == pytest.approx([h["val/dice"] for h in result.history])
    tags = run.data.tags
    assert tags["split_hash"] and tags["dataset_fingerprint"] and tags["git_commit"]
    assert tags["dataset"] == "Task900_SynthLiverTumor"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"checkpoint", "config.yaml", "splits.json", "val_per_case.csv", "plots/learning_curve.png",
            "plots/overlays"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/best.pt"]


def test_nan_loss_marks_the_run_failed(tiny_cfg):
    cfg = tiny_cfg(training={"optimizer": "sgd", "lr": 1e12})
    with pytest.raises(NonFiniteLossError):
        train_tracked(cfg, progress=False)
    client = get_client(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "NonFiniteLossError" in runs[0].data.tags["error"]


def test_cli_errors_are_one_line(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"optimizer": "sgd", "lr": 1e12})
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1  # a failed job; a bad config or command line is 2 (below)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "training loss is" in errors[0] and "Traceback" not in proc.stderr

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--set", "training.lrr=1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {path}: training.lrr: unknown key"


def test_eval_run_is_linked_to_its_training_run(tiny_cfg, tmp_path):
    from medseg.evaluation import evaluate_checkpoint, log_eval_run

    cfg = tiny_cfg(training={"epochs": 1})
    result, run_id = train_tracked(cfg, progress=False)
    ev = evaluate_checkpoint(result.best_checkpoint, cfg, progress=False)
    eval_run_id = log_eval_run(cfg, ev, ev.write(tmp_path / "eval"))
    client = get_client(tracking_uri(cfg))
    run = client.get_run(eval_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["training_run_id"] == run_id
    assert run.data.tags["kind"] == "eval"
    assert run.data.metrics["eval/dice"] == pytest.approx(ev.summary["dice"])
    assert {a.path for a in client.list_artifacts(eval_run_id, "eval")} == {"eval/per_case.csv", "eval/per_case.json",
                                                                             "eval/summary.json"}


def test_ui_command_names_the_store_it_was_given(tmp_path):
    from medseg.tracking import ui_command

    (tmp_path / "Makefile").write_text("mlflow-ui:\n")
    assert ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path) == "make mlflow-ui"
    other = tmp_path / "elsewhere" / "mlflow.db"
    cmd = ui_command(f"sqlite:///{other}", cwd=tmp_path)   # `make mlflow-ui` would open the repository's store
    assert cmd.startswith(f"mlflow ui --backend-store-uri sqlite:///{other} ")
    assert f"--default-artifact-root {other.parent / 'mlartifacts'}" in cmd
    assert "open http://mlflow:5000" in ui_command("http://mlflow:5000", cwd=tmp_path)


def test_sigterm_ends_the_run_killed(tiny_cfg, tmp_path):
    """`kill`, `timeout` or a scheduler's preemption send SIGTERM: the run must not stay RUNNING."""
    import signal

    cfg = tiny_cfg(training={"epochs": 50})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = get_client(tracking_uri(cfg))

    def run_with_an_epoch():
        exp = client.get_experiment_by_name("tests")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0] if runs and client.get_metric_history(runs[0].info.run_id, "val/dice") else None

    run = wait_while_running(proc, run_with_an_epoch, timeout=600, what="training's first epoch")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated"
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_experiments_are_tagged_for_the_ml_ui(tmp_path):
    """MLflow 3's UI reads `mlflow.experimentKind`: medseg's experiments are "Machine learning" (runs, charts), not
    GenAI."""
    from medseg.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment

    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = get_client(uri)
    new_id = ensure_experiment(uri, "fresh")
    assert client.get_experiment(new_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    old_id = client.create_experiment("from-an-older-medseg")  # a store written before the tag existed
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    assert ensure_experiment(uri, "from-an-older-medseg") == old_id
    assert client.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    user_id = client.create_experiment("switched-in-the-ui", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(uri, "switched-in-the-ui") == user_id
    assert client.get_experiment(user_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice is kept
    assert ensure_experiment(uri, "fresh") == new_id
