"""One prepared GPU check (issue 12 item 8), run by benchmarks/gpu_check.sh: every step in its own process with its
own timeout inside one time budget, every result in one JSON file.

    bash benchmarks/gpu_check.sh                       # on a GPU box, from the repository root (about 6 min)
    GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh  # dry run of the plumbing on a CPU: tiny sizes, 1 epoch

Steps (a failed, timed-out or skipped step is recorded with its error and the next one runs):
  environment   nvidia-smi (name, driver, memory), torch / CUDA / cuDNN versions, bf16, package versions
  data          the embedded dataset (what `make data` runs), when data/synthetic lacks it
  bench_<S>px   benchmarks/bench_train.py at S px (256 and 512): trainer against the bare loop with AMP on cuda,
                images/s, their ratio, peak GPU memory of each loop (torch.cuda.max_memory_allocated)
  determinism   two identical train.py runs with training.deterministic: true on cuda; their history.json
                compared epoch by epoch (timings left out)
  tune_smoke    tune.py on search_spaces/smoke.yaml with 4 trials, 4 at a time, resources.gpu 0.25 each: wall time,
                trial statuses, champion decision

This file uses the standard library only (PyYAML when present): it runs even when the venv could not be built, and
then records why every step failed. Everything but the dataset is written to a temporary folder, removed at the end
(GPU_CHECK_KEEP=1 keeps it, with each step's log). Settings come from the environment:

  GPU_CHECK_DEVICE    cuda (default) or cpu (dry run)
  GPU_CHECK_BUDGET_S  seconds for the whole check, counted from the start of gpu_check.sh (default 450 on cuda,
                      900 on cpu); each step's timeout is cut to what is left, and a step that no longer fits is
                      skipped (a step killed at its timeout gets up to 25 s more to end: 450 s ends inside 8 minutes)
  GPU_CHECK_SIZES     image sizes of the throughput benchmark (default 256,512; cpu 64,96)
  GPU_CHECK_OUT       the JSON file (default $OUT/gpu_check.json when $OUT is set, else
                      benchmarks/results/gpu_check.json; cpu: gpu_check_cpu_dry.json there)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "data" / "synthetic" / "Task900_SynthLiverTumor"
BASE_CONFIG = REPO / "configs" / "exp_000_baseline.yaml"
RESERVE_S = 8  # kept back from the budget for writing the JSON
TIMING_KEYS = {"epoch_seconds", "train/images_per_s"}  # history.json keys that are wall-clock, not results

# Per device: sizes and timeouts (seconds) of each step. The cuda figures are sized for one H200 with 16 cores, where
# the whole check takes about 6 minutes; the timeouts only stop hangs.
PROFILES = {
    "cuda": {
        "sizes": (256, 512),
        "bench": {"epochs": 4, "samples": 1024, "repeats": 2, "timeout": 150, "min": 45},
        "determinism": {"epochs": 3, "samples": 256, "timeout": 90, "min": 30},
        "tune": {"trials": 4, "concurrent": 4, "gpu": 0.25, "epochs": None, "samples": None, "timeout": 200, "min": 90},
        "budget": 450,
    },
    "cpu": {  # the dry run: the same commands with tiny sizes and 1 epoch, on the 2-core development machine
        "sizes": (64, 96),
        "bench": {"epochs": 2, "samples": 32, "repeats": 1, "timeout": 300, "min": 45},
        "determinism": {"epochs": 1, "samples": 32, "timeout": 180, "min": 30},
        "tune": {"trials": 4, "concurrent": 4, "gpu": 0, "epochs": 1, "samples": 32, "timeout": 400, "min": 90},
        "budget": 900,
    },
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _tail(path: Path, chars: int = 2500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def _smi_lines(query: str) -> list[str]:
    """nvidia-smi's CSV answer to one query, line by line (no header, no units)."""
    done = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                          timeout=10)
    return done.stdout.strip().splitlines()


class GpuPoller:
    """Samples nvidia-smi's compute processes and used memory every ``every`` seconds while a step runs (how many
    trials shared the GPU); a machine whose nvidia-smi cannot list processes reports 0 processes."""

    def __init__(self, every: float = 2.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                apps = _smi_lines("--query-compute-apps=pid,used_memory")
                used = _smi_lines("--query-gpu=memory.used,utilization.gpu")
                mem, util = (float(v) for v in used[0].split(",")[:2]) if used else (math.nan, math.nan)
                self.samples.append({"processes": len([a for a in apps if a.strip()]), "memory_used_mib": mem,
                                     "util_pct": util})
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict:
        if not self.samples:
            return {"samples": 0}
        finite = [s for s in self.samples if not math.isnan(s["memory_used_mib"])]
        return {"samples": len(self.samples), "max_processes": max(s["processes"] for s in self.samples),
                "max_memory_used_mib": max((s["memory_used_mib"] for s in finite), default=None),
                "max_util_pct": max((s["util_pct"] for s in finite), default=None)}


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.profile = PROFILES[args.device]
        self.budget_s = float(os.environ.get("GPU_CHECK_BUDGET_S") or self.profile["budget"])
        self.started = args.started or time.time()
        self.deadline = self.started + self.budget_s
        sizes = os.environ.get("GPU_CHECK_SIZES")
        self.sizes = tuple(int(s) for s in sizes.split(",") if s.strip()) if sizes else self.profile["sizes"]
        self.py = args.python
        self.out = Path(args.out).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.keep = os.environ.get("GPU_CHECK_KEEP") == "1"
        self.env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"}
        self.env.pop("MLFLOW_TRACKING_URI", None)  # every step names its own store in the work folder
        self.current: subprocess.Popen | None = None
        self.result: dict = {
            "check": "gpu_check", "date": _now(), "device": self.device, "ok": None,
            "settings": {"budget_s": self.budget_s, "sizes": list(self.sizes), "python": self.py,
                         "profile": {k: v for k, v in self.profile.items() if k not in ("sizes", "budget")}},
            "steps": {}, "summary": {},
            "notes": ("steps.*.wall_s is each step's wall time (process start and imports included); timeout_s the "
                      "limit it ran under (its default cut to what was left of budget_s). bench_*: bench_train.py's "
                      "figures, trainer_over_bare the median over interleaved epoch pairs (warm epochs), "
                      "peak_gpu_memory_bytes per loop (each peak includes the other loop's resident weights and "
                      "optimizer state). determinism: per-epoch metrics of two identical runs compared for equality, "
                      "timing keys left out. tune_smoke: the study report's trials and champion decision; gpu_poll: "
                      "nvidia-smi samples during the study (max_processes 0 where nvidia-smi cannot list processes)."),
        }
        if args.venv_rc is not None:
            venv = {"ran": True, "rc": args.venv_rc, "wall_s": args.venv_wall_s, "ok": args.venv_rc == 0,
                    "command": "make venv"}
            if args.venv_rc != 0 and args.venv_log:
                venv["error"] = _tail(Path(args.venv_log))
            self.result["steps"]["venv"] = venv
        else:
            note = "interpreter given by GPU_CHECK_PYTHON" if args.python_given else ".venv present"
            self.result["steps"]["venv"] = {"ran": False, "ok": True, "note": note}
        if args.python_fallback:  # the venv's (or GPU_CHECK_PYTHON's) interpreter does not run
            self.result["steps"]["venv"].update(ok=False, fallback_python=self.py,
                                                error=self.result["steps"]["venv"].get("error", "") + "\nno runnable "
                                                "interpreter: the steps ran under python3")

    # ------------------------------------------------------------------------------------------- plumbing

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def write(self) -> None:
        self.result["wall_s"] = round(time.time() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.out)

    def run(self, name: str, cmd: list[str], *, timeout: float, min_s: float, cwd: Path = REPO) -> dict:
        """One command in its own process group, killed (TERM, then KILL) at its timeout. Returns a record."""
        limit = min(timeout, self.left())
        rec: dict = {"command": shlex.join(str(c) for c in cmd), "timeout_s": round(max(0.0, limit), 1)}
        if limit < min_s:
            rec.update(ok=False, skipped=True, error=f"skipped: {max(0, self.left()):.0f} s left of the "
                                                      f"{self.budget_s:.0f} s budget, the step needs at least "
                                                      f"{min_s:.0f} s")
            print(f"   {name}: SKIPPED ({rec['error']})", flush=True)
            return rec
        log = self.work / f"{name}.log"
        started = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.current = proc
            timed_out = False
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = self._kill(proc)
            finally:
                self.current = None
        rec.update(rc=rc, wall_s=round(time.perf_counter() - started, 1), timed_out=timed_out,
                   ok=rc == 0 and not timed_out)
        if self.keep:
            rec["log"] = str(log)
        if not rec["ok"]:
            why = f"timed out after {limit:.0f} s; " if timed_out else f"exit {rc}; "
            rec["error"] = why + "log tail:\n" + _tail(log)
            print(f"   {name}: FAILED ({'timeout' if timed_out else f'exit {rc}'}, {rec['wall_s']} s); last lines:",
                  flush=True)
            print("     " + "\n     ".join(_tail(log, 1500).splitlines()[-15:]), flush=True)
        return rec

    @staticmethod
    def _kill(proc: subprocess.Popen) -> int:
        """SIGTERM to the step's process group (tune.py and train.py end their runs on it), SIGKILL 15 s later."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                return proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll() if proc.poll() is not None else -9

    def step(self, name: str, fn) -> None:
        print(f"== {name} ({max(0, self.left()):.0f} s of budget left)", flush=True)
        started = time.perf_counter()
        try:
            rec = fn(name)
        except Exception:  # a bug or an unexpected output of a step: recorded, the next step runs
            rec = {"ok": False, "error": traceback.format_exc()[-3000:]}
        rec.setdefault("wall_s", round(time.perf_counter() - started, 1))
        self.result["steps"][name] = rec
        print(f"   {name}: {'ok' if rec.get('ok') else 'NOT OK'} ({rec['wall_s']} s)", flush=True)
        self.write()

    # ---------------------------------------------------------------------------------------------- steps

    def environment(self, name: str) -> dict:
        rec: dict = {"host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                              "loadavg": [round(v, 2) for v in os.getloadavg()]}}
        try:
            rec["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                               timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            rec["git_commit"] = None
        if shutil.which("nvidia-smi"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
                rec["nvidia_smi"] = [dict(zip(("name", "driver_version", "memory_total", "compute_cap"),
                                              (v.strip() for v in line.split(","))))
                                     for line in q.stdout.strip().splitlines()] or {"error": q.stderr.strip()[-500:]}
            except (OSError, subprocess.SubprocessError) as err:
                rec["nvidia_smi"] = {"error": str(err)}
        else:
            rec["nvidia_smi"] = None if self.device == "cpu" else {"error": "nvidia-smi not on PATH"}
        probe = self.work / "probe.json"
        code = (
            "import json, platform, sys\n"
            "from importlib.metadata import version, PackageNotFoundError\n"
            "out = {'python': platform.python_version(), 'executable': sys.executable, 'packages': {}}\n"
            "for p in ('torch', 'torchvision', 'segmentation-models-pytorch', 'timm', 'albumentations', 'ray',\n"
            "          'optuna', 'mlflow', 'numpy', 'pydantic'):\n"
            "    try: out['packages'][p] = version(p)\n"
            "    except PackageNotFoundError: out['packages'][p] = None\n"
            "import torch\n"
            "out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),\n"
            "           cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    out.update(device_count=torch.cuda.device_count(), device_name=p.name,\n"
            "               capability=f'{p.major}.{p.minor}', total_memory_gib=round(p.total_memory / 2**30, 1),\n"
            "               multiprocessors=p.multi_processor_count)\n"
            "    from medseg.models import native_bf16\n"
            "    out['amp_dtype'] = 'bfloat16' if native_bf16() else 'float16 (GradScaler)'\n"
            f"open({str(probe)!r}, 'w').write(json.dumps(out))\n"
        )
        run = self.run(name, [self.py, "-c", code], timeout=90, min_s=10)
        if probe.exists():
            rec["python"] = json.loads(probe.read_text())
        rec.update({k: run[k] for k in ("ok", "wall_s", "error", "skipped") if k in run})
        if self.device == "cuda" and not rec.get("python", {}).get("cuda_available"):
            rec["ok"] = False
            rec.setdefault("error", "torch sees no CUDA device: every cuda step will fail")
        return rec

    def data(self, name: str) -> dict:
        if (TASK / "metadata.json").exists():
            return {"ok": True, "existed": True, "path": str(TASK.relative_to(REPO))}
        # what `make data` runs (make itself would first want to build .venv, even with another interpreter)
        rec = self.run(name, [self.py, "-m", "medseg.data.synthetic", "--out", "data/synthetic"], timeout=150, min_s=20)
        rec.update(existed=False, path=str(TASK.relative_to(REPO)))
        return rec

    def bench_config(self) -> Path:
        """The base config without its augmentation (bench_train removes it from both loops anyway): bench_train then
        skips its extra measurement of the loader with the config's augmentation, which says nothing here."""
        try:
            import yaml
        except ImportError:
            return BASE_CONFIG
        raw = yaml.safe_load(BASE_CONFIG.read_text())
        raw["augment"] = []
        path = self.work / "bench_config.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def bench(self, name: str, size: int) -> dict:
        b = self.profile["bench"]
        out = self.work / f"{name}.json"
        sets = {"training.device": self.device, "training.amp": "true", "training.deterministic": "false",
                "dataset.image_size": size}
        cmd = [self.py, "benchmarks/bench_train.py", "--config", self.bench_config(), "--epochs", b["epochs"],
               "--samples", b["samples"], "--repeats", b["repeats"], "--data", self.work / "bench_data", "--out", out]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        rec = self.run(name, cmd, timeout=b["timeout"], min_s=b["min"])
        rec.update(image_size=size, amp=True, deterministic=False, cudnn_benchmark=self.device == "cuda")
        if not out.exists():
            rec["ok"] = False
            return rec
        r = json.loads(out.read_text())
        peak = r.get("cuda_peak_memory_bytes")
        params, ratios = r["params"], r["ratios"]
        rec.update({
            "batch_size": params["batch_size"], "epochs": params["epochs"],
            "samples_per_epoch": params["samples_per_epoch"], "repeats": params["repeats"], "data": params["data"],
            "torch_threads": r["machine"]["torch_threads"], "device_used": r.get("device"),
            "trainer_images_per_s": r["trainer"]["images_per_s"], "bare_images_per_s": r["bare"]["images_per_s"],
            "trainer_over_bare": ratios["trainer_over_bare"],
            "trainer_over_bare_of_medians": ratios["trainer_over_bare_of_medians"],
            "trainer_over_bare_fastest_step": ratios["trainer_over_bare_fastest_step"],
            "trainer_over_bare_target_met": r["targets"]["trainer_over_bare"]["met"],
            "loader_images_per_s": r["loader"]["images_per_s"], "loader_over_trainer": ratios["loader_over_trainer"],
            "data_wait_fraction": r["trainer"]["data_wait_fraction"],
            "fit_breakdown_s": r["trainer"]["fit_breakdown_s"],
            "same_work": r["same_work"],
            "peak_gpu_memory_bytes": peak,
            "peak_gpu_memory_gib": {k: round(v / 2**30, 3) for k, v in peak.items()} if peak else None,
            "per_run": [{"order": run["order"],
                         "trainer_images_per_s": [round(v, 1) for v in run["trainer"]["per_epoch_images_per_s"]],
                         "bare_images_per_s": [round(v, 1) for v in run["bare"]["per_epoch_images_per_s"]]}
                        for run in r["runs"]],
            "bench_seconds_total": r["seconds_total"],
        })
        if self.device == "cuda" and not peak:
            rec["ok"] = False
            rec["error"] = f"bench_train ran on {r.get('device')}, not cuda: no peak GPU memory"
        return rec

    def determinism(self, name: str) -> dict:
        d = self.profile["determinism"]
        root = self.work / "determinism"
        histories, runs = [], {}
        for i in (1, 2):
            cmd = [self.py, "train.py", "--config", "configs/exp_000_baseline.yaml", "--quiet"]
            for k, v in {"training.device": self.device, "training.deterministic": "true", "training.amp": "true",
                         "training.epochs": d["epochs"], "training.samples_per_epoch": d["samples"],
                         "training.val_overlays": 0,
                         "dataset.cache_dir": self.work / "cache", "output.run_dir": root / f"run{i}",
                         "output.run_name": f"determinism-{i}", "output.experiment": "gpu-check-determinism",
                         "output.tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}.items():
                cmd += ["--set", f"{k}={v}"]
            root.mkdir(parents=True, exist_ok=True)
            rec = self.run(f"{name}_run{i}", cmd, timeout=d["timeout"], min_s=d["min"])
            found = sorted((root / f"run{i}").glob("*/history.json"))
            rec["wrote_history"] = bool(found)
            log = self.work / f"{name}_run{i}.log"
            rec["warnings"] = _determinism_warnings(log) if log.exists() else []
            runs[f"run{i}"] = rec
            if not rec["ok"] or not found:
                return {"ok": False, "runs": runs, "error": rec.get("error", f"run {i} wrote no history.json")}
            histories.append(json.loads(found[0].read_text()))
        cmp = compare_histories(*histories)
        return {"ok": True, "identical": cmp["identical"], "epochs": d["epochs"], "samples_per_epoch": d["samples"],
                "amp": True, "deterministic": True, "comparison": cmp, "runs": runs,
                "val_dice_per_epoch": [h.get("val/dice") for h in histories[0]]}

    def tune(self, name: str) -> dict:
        t = self.profile["tune"]
        root = self.work / "tune"
        cpus = os.cpu_count() or 1
        cpu_per_trial = max(1, cpus // t["concurrent"]) if self.device == "cuda" else max(0.25, cpus / t["concurrent"])
        limit = min(t["timeout"], self.left())
        sets = {"num_samples": t["trials"], "max_concurrent": t["concurrent"], "resources.gpu": t["gpu"],
                "resources.cpu": cpu_per_trial, "storage_path": root / "ray", "reports_dir": root / "reports",
                "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "gpu-check-smoke",
                "champion.models_dir": root / "models", "champion.registry_name": "gpu-check-smoke",
                # Tune ends the study itself before the step's timeout, so a slow study still reaches its decision
                "time_budget_s": max(30, int(limit - 60)),
                "overrides.training.device": self.device, "overrides.dataset.cache_dir": self.work / "cache"}
        if t["epochs"]:
            sets.update({"overrides.training.epochs": t["epochs"], "asha.max_t": t["epochs"], "asha.grace_period": 1})
        if t["samples"]:
            sets["overrides.training.samples_per_epoch"] = t["samples"]
        cmd = [self.py, "tune.py", "--space", "search_spaces/smoke.yaml", "--num-cpus", cpus]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        root.mkdir(parents=True, exist_ok=True)
        poller = GpuPoller() if self.device == "cuda" and shutil.which("nvidia-smi") else None
        if poller:
            with poller:
                rec = self.run(name, cmd, timeout=t["timeout"], min_s=t["min"])
            rec["gpu_poll"] = poller.summary()
        else:
            rec = self.run(name, cmd, timeout=t["timeout"], min_s=t["min"])
        rec.update(trials=t["trials"], max_concurrent=t["concurrent"], gpu_per_trial=t["gpu"],
                   cpu_per_trial=cpu_per_trial, time_budget_s=sets["time_budget_s"])
        reports = sorted((root / "reports").glob("*.json"))
        if not reports:
            rec["ok"] = False
            rec.setdefault("error", "no study report written")
            return rec
        r = json.loads(reports[0].read_text())
        dec = r.get("decision") or {}
        rec.update({
            "study": r["study"], "study_seconds": r["seconds"], "n_trials": r["n_trials"],
            "status_counts": r["status_counts"],
            "epochs_used": r["epochs_used"], "epochs_without_early_stopping": r["epochs_without_early_stopping"],
            "best_trial": r["best_trial"],
            "trials": [{k: trial.get(k) for k in ("trial_id", "status", "params", "best_value", "epochs_used",
                                                  "node_id")} for trial in r["trials"]],
            "decision": {k: dec.get(k) for k in ("alias", "promoted", "reason", "registry_name", "version")}
            if dec else None,
            "candidate_dice": (dec.get("candidate") or {}).get("dice") if dec else None,
        })
        if not dec:
            rec["ok"] = False
            hint = (" (no trial ran: did Ray see the GPU? resources.gpu needs Ray to detect it)"
                    if not r["n_trials"] and t["gpu"] else "")
            rec.setdefault("error", "the study made no champion decision" + hint)
        return rec

    # ----------------------------------------------------------------------------------------------- main

    def main(self) -> int:
        print(f"gpu check on {self.device}: budget {self.budget_s:.0f} s, {max(0, self.left()):.0f} s left; "
              f"python {self.py}; JSON -> {self.out}", flush=True)
        self.write()
        try:
            self.step("environment", self.environment)
            self.step("data", self.data)
            for size in self.sizes:
                self.step(f"bench_{size}px", lambda name, s=size: self.bench(name, s))
            self.step("determinism", self.determinism)
            self.step("tune_smoke", self.tune)
        except KeyboardInterrupt:
            if self.current is not None:
                self._kill(self.current)
            self.result["interrupted"] = True
        finally:
            self.summarise()
            self.write()
            if self.keep:
                print(f"work folder kept: {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        return 0 if self.result["ok"] else 1

    def summarise(self) -> None:
        s = self.result["steps"]
        summ: dict = {"steps_ok": {k: bool(v.get("ok")) for k, v in s.items()}}
        env = s.get("environment", {})
        py = env.get("python", {})
        smi = env.get("nvidia_smi")
        summ["gpu"] = smi[0].get("name") if isinstance(smi, list) and smi else py.get("device_name")
        summ["driver"] = smi[0].get("driver_version") if isinstance(smi, list) and smi else None
        summ["torch"], summ["cuda"] = py.get("torch"), py.get("cuda")
        for k, v in s.items():
            if k.startswith("bench_") and "trainer_images_per_s" in v:
                summ[k] = {key: v[key] for key in ("trainer_images_per_s", "bare_images_per_s", "trainer_over_bare",
                                                   "peak_gpu_memory_gib")}
        if "identical" in s.get("determinism", {}):
            summ["deterministic_runs_identical"] = s["determinism"]["identical"]
        tune = s.get("tune_smoke", {})
        if tune.get("decision"):
            summ["tune_smoke"] = {"wall_s": tune.get("wall_s"), "status_counts": tune.get("status_counts"),
                                  "decision": tune["decision"].get("alias")}
        self.result["summary"] = summ
        self.result["ok"] = all(summ["steps_ok"].values())
        print("summary: " + json.dumps(summ, default=str), flush=True)
        print(f"-> {self.out} ({time.time() - self.started:.0f} s)", flush=True)


def _determinism_warnings(log: Path) -> list[str]:
    """PyTorch's warnings about operations without a deterministic implementation, once each."""
    seen: list[str] = []
    for line in _tail(log, 200_000).splitlines():
        if "determinis" in line and "Warning" in line and line.strip() not in seen:
            seen.append(line.strip()[:400])
    return seen[:10]


def compare_histories(a: list[dict], b: list[dict]) -> dict:
    """Per-epoch metrics of two runs (history.json), timing keys left out: equal to the bit, or where they differ."""
    diffs, max_abs = [], {}
    if len(a) != len(b):
        return {"identical": False, "epochs": [len(a), len(b)],
                "differences": [{"error": "different numbers of epochs"}]}
    for ea, eb in zip(a, b):
        for key in sorted((set(ea) | set(eb)) - TIMING_KEYS):
            va, vb = ea.get(key), eb.get(key)
            same = va == vb or (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb))
            if not same:
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                    max_abs[key] = max(max_abs.get(key, 0.0), abs(va - vb))
                if len(diffs) < 10:
                    diffs.append({"epoch": ea.get("epoch"), "key": key, "run1": va, "run2": vb})
    return {"identical": not diffs, "epochs": len(a),
            "keys_compared": sorted((set(a[0]) if a else set()) - TIMING_KEYS), "differences": diffs,
            "max_abs_difference": max_abs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="interpreter of the steps")
    parser.add_argument("--python-given", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--python-fallback", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=tuple(PROFILES), default=os.environ.get("GPU_CHECK_DEVICE") or "cuda")
    parser.add_argument("--out", help="the JSON file (default: see the module docstring)")
    parser.add_argument("--started", type=float, help="epoch seconds the check began (gpu_check.sh's start)")
    parser.add_argument("--venv-rc", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--venv-wall-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--venv-log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.out:
        name = "gpu_check.json" if args.device == "cuda" else "gpu_check_cpu_dry.json"
        args.out = os.environ.get("GPU_CHECK_OUT") or (
            str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else
            str(REPO / "benchmarks" / "results" / name))
    return Check(args).main()


if __name__ == "__main__":
    raise SystemExit(main())
