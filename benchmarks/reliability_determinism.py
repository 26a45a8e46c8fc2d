#!/usr/bin/env python
"""Determinism as a contract (issue 14, guarantee 7): on one machine, the same config and seed give the same split,
cache, per-epoch metrics, weights and champion decision, and a study killed and resumed picks the same champion as
one that ran through.

- ``train``: ``train.py`` of one tiny config run twice in fresh processes, each with its own cache folder and MLflow
  store (nothing shared but the data): the bytes of ``splits.json`` and of the cache's arrays, every value of every
  epoch of ``history.json``, and the weights of ``best.pt`` compared (times and paths left out).
- ``study``: ``tune.py`` of one small space (3 trials of 2 epochs, one at a time, no early stopping) run three times,
  each in a fresh folder and store: twice through, once interrupted with Ctrl-C (SIGINT) while a trial is between
  its epochs and then ``--resume``d. Compared: each trial's configuration and every per-epoch value of its history,
  the best trial, and the champion decision (promoted, version, re-evaluated Dice, IoU, micro Dice, per-case Dice).

What does change across machines (CPU models: other SIMD kernels, other float summation orders) is documented in
docs/reliability.md; this harness compares runs on one machine only. ``run(quick)`` is the determinism section of
benchmarks/bench_reliability.py (``quick``: the train part only).

  python benchmarks/reliability_determinism.py [--quick]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.reliability_concurrency import child_env, tiny_config

REPO = Path(__file__).resolve().parents[1]
NAME = "determinism"


def _task(base: Path) -> Path:
    from medseg.data.synthetic import generate_task

    data = base / "data"
    generate_task(data, cases=8, size=64, slices=(6, 8), seed=0)
    return data


def _config(data: Path, work: Path, epochs: int = 2) -> dict[str, Any]:
    cfg = tiny_config(data, work / "cache", work)
    cfg["training"]["epochs"] = epochs
    cfg["output"]["experiment"] = NAME
    return cfg


# --------------------------------------------------------------------------------------------------- compare


def compare_values(a: Any, b: Any, where: str = "") -> tuple[int, list[str]]:
    """(values compared, where they differ): numbers must be equal to the bit (NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        n, diff = 0, [] if set(a) == set(b) else [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        for key in sorted(set(a) & set(b)):
            m, d = compare_values(a[key], b[key], f"{where}.{key}")
            n, diff = n + m, diff + d
        return n, diff
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 1, [f"{where}: {len(a)} vs {len(b)} items"]
        n, diff = 0, []
        for i, (x, y) in enumerate(zip(a, b)):
            m, d = compare_values(x, y, f"{where}[{i}]")
            n, diff = n + m, diff + d
        return n, diff
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return 1, [] if same else [f"{where}: {a!r} vs {b!r}"]


def _digest_files(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- train


TIMING_KEYS = ("seconds", "per_s")  # wall-clock figures of an epoch: not part of the contract


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in epoch.items() if not any(t in k for t in TIMING_KEYS)} for epoch in history]


def train_once(data: Path, work: Path) -> dict[str, Any]:
    """train.py of the tiny config in a fresh process; what determinism is judged on."""
    from medseg.checkpoint import load_checkpoint

    work.mkdir(parents=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(_config(data, work)))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(path), "--quiet"], cwd=work,
                          env=child_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed: {proc.stderr[-2000:]}")
    (run_dir,) = [p.parent for p in (work / "runs").rglob("history.json")]
    splits = list((work / "cache").rglob("splits.json"))
    arrays = [p for p in (work / "cache").rglob("*.npy")]
    state = load_checkpoint(run_dir / "best.pt")["state_dict"]
    weights = hashlib.sha256(b"".join(name.encode() + state[name].numpy().tobytes() for name in sorted(state)))
    return {"splits": [p.read_text() for p in splits], "cache": _digest_files(arrays, work / "cache"),
            "history": without_timing(json.loads((run_dir / "history.json").read_text())),
            "weights": weights.hexdigest(), "n_arrays": len(arrays)}


def train_twice(base: Path, data: Path) -> dict[str, Any]:
    started = time.perf_counter()
    first, second = (train_once(data, base / f"train{i}") for i in (1, 2))
    compared, differ = compare_values(first, second)
    return {"runs": 2, "epochs": len(first["history"]), "metrics_per_epoch": sorted(first["history"][0]),
            "values_compared": compared, "differing": differ[:10],
            "split_identical": first["splits"] == second["splits"] and bool(first["splits"]),
            "cache_identical": first["cache"] == second["cache"] and first["n_arrays"] > 0,
            "weights_identical": first["weights"] == second["weights"],
            "seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------------------------------- study


def study_files(data: Path, work: Path) -> list[str]:
    """A 3-trial space of the tiny config in ``work``; the tune.py command that runs it."""
    work.mkdir(parents=True)
    (work / "base.yaml").write_text(yaml.safe_dump(_config(data, work)))
    space = {"name": NAME, "base_config": "base.yaml", "num_samples": 3, "max_concurrent": 1, "resources": {"cpu": 1},
             "asha": {"enabled": False, "max_t": 2}, "max_failures": 0, "storage_path": str(work / "ray"),
             "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": NAME,
             "reports_dir": str(work / "reports"), "optuna_seed": 0,
             "params": {"training.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}},
             "champion": {"registry_name": NAME, "models_dir": str(work / "models"), "bootstrap_resamples": 1000}}
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    return [sys.executable, str(REPO / "tune.py"), "--space", str(work / "space.yaml"), "--name", NAME,
            "--num-cpus", "2"]


def study_outcome(work: Path) -> dict[str, Any]:
    report = json.loads((work / "reports" / f"{NAME}.json").read_text())
    trials = sorted(({"params": t["params"], "status": t["status"], "best_value": t["best_value"],
                      "history": without_timing(t["history"])} for t in report["trials"]),
                    key=lambda t: json.dumps(t["params"]))
    decision = report["decision"]
    keys = ("dice", "iou", "dice_micro", "per_case_dice", "n_cases")
    best = [t["params"] for t in report["trials"] if t["trial_id"] == report.get("best_trial")]
    return {"trials": trials, "best_params": best[0] if best else None,
            "decision": {"promoted": decision["promoted"], "version": decision["version"],
                         **{k: decision["candidate"][k] for k in keys}}}


def _between_epochs(study_dir: Path) -> bool:
    """One trial finished (2 epochs) and another between its epochs (1 epoch in its history)."""
    counts = []
    for path in study_dir.glob("artifacts/*/history.json"):
        try:
            counts.append(len(json.loads(path.read_text())))
        except ValueError:
            pass
    return 2 in counts and 1 in counts


def interrupted_study(cmd: list[str], work: Path, timeout: float = 900) -> dict[str, Any]:
    """Ctrl-C once a trial is between its epochs, then ``--resume``; what the interruption hit."""
    proc = subprocess.Popen(cmd, cwd=work, env={**child_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    deadline = time.monotonic() + timeout
    while not _between_epochs(work / "ray" / NAME):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the study ended before it could be interrupted: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    interrupted = proc.returncode == 130
    resumed = subprocess.run(cmd + ["--resume"], cwd=work, env=child_env(), capture_output=True, text=True,
                             timeout=timeout)
    if resumed.returncode != 0:
        raise RuntimeError(f"--resume failed: {resumed.stderr[-2000:]}")
    return {"interrupted_exit_code": proc.returncode, "interrupted": interrupted}


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background parent may have left SIGINT ignored


def studies(base: Path, data: Path) -> dict[str, Any]:
    started = time.perf_counter()
    outcomes, interruption = {}, None
    for label in ("through_1", "through_2", "interrupted"):
        work = base / label
        cmd = study_files(data, work)
        if label == "interrupted":
            interruption = interrupted_study(cmd, work)
        else:
            proc = subprocess.run(cmd, cwd=work, env=child_env(), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"tune.py failed: {proc.stderr[-2000:]}")
        outcomes[label] = study_outcome(work)
    n_same, diff_same = compare_values(outcomes["through_1"], outcomes["through_2"])
    n_resumed, diff_resumed = compare_values(outcomes["through_1"], outcomes["interrupted"])
    return {"studies": 3, "trials_each": 3, **interruption,
            "same_seed": {"values_compared": n_same, "differing": diff_same[:10]},
            "killed_and_resumed": {"values_compared": n_resumed, "differing": diff_resumed[:10]},
            "same_champion": outcomes["through_1"]["decision"] == outcomes["interrupted"]["decision"]
            == outcomes["through_2"]["decision"],
            "champion": outcomes["through_1"]["decision"]["version"],
            "champion_dice": outcomes["through_1"]["decision"]["dice"],
            "seconds": round(time.perf_counter() - started, 1)}


def run(quick: bool) -> dict[str, Any]:
    """The determinism section: train twice; unless ``quick``, the three studies."""
    from medseg.machine import cpu_model

    with tempfile.TemporaryDirectory(prefix="medseg-determinism-") as tmp:
        base = Path(tmp)
        data = _task(base)
        out = {"cpu": cpu_model(), "train": train_twice(base, data)}
        if not quick:
            out["study"] = studies(base, data)
    differing = len(out["train"]["differing"]) + sum(len(out.get("study", {}).get(k, {}).get("differing", []))
                                                    for k in ("same_seed", "killed_and_resumed"))
    identical = (out["train"]["split_identical"] and out["train"]["cache_identical"]
                 and out["train"]["weights_identical"])
    out["values_differing"] = differing
    out["nothing_lost"] = differing == 0 and identical and (quick or (out["study"]["same_champion"]
                                                                      and out["study"]["interrupted"]))
    out["tests"] = ("tests/test_training.py::test_same_config_twice_gives_identical_epoch_metrics, "
                    "tests/test_tuning_cluster.py::test_ctrl_c_then_resume_does_not_rerun_finished_trials")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
