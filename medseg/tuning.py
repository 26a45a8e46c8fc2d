"""Ray Tune study: the trainer as a function trainable, OptunaSearch + ASHA, and driver-side MLflow.

Layout of a study (all paths absolute, so trials running in other working directories or on other nodes
of a cluster with shared storage find them)::

    <storage_path>/<study>/                Ray Tune experiment folder (trial checkpoints, tuner state)
    <storage_path>/<study>/medseg_study.json   parent MLflow run id, space, status (for --resume)
    <storage_path>/<study>/artifacts/<trial id>/   fit()'s run folder of each trial

MLflow is written by the driver only (``MlflowTrialCallback``): one parent run per study, one child run per
trial with the same params and metric keys as train.py. Trials never touch the tracking store, so a
sqlite store sees a single writer and runs get their final status from the driver even when ASHA stops a
trial in the middle of its loop (the trial process is gone by then).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.config import config_from_dict
from medseg.errors import RunInterrupted, UsageError
from medseg.io_utils import atomic_write_json
from medseg.search_space import SearchSpace

FIXED_KEY = "config_file"
OBJECTIVE = "objective"  # running best of the space's metric, what Optuna and ASHA compare
PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "medseg_study.json"
LOGGED_PREFIXES = ("train/", "val/", "best/")
LOGGED_KEYS = ("lr", "epoch_seconds")
HISTORY_KEYS = ("epoch", "train/loss", "train/dice", "train/iou", "val/loss", "val/dice", "val/iou")  # trial records


# ---------------------------------------------------------------------------------------------- trial


def trial_config(sampled: dict[str, Any], space: SearchSpace):
    """Resolved Config of a trial: a fixed config file, or the base config with the sampled values."""
    if FIXED_KEY in sampled:
        cfg = config_from_dict(space.fixed_configs[sampled[FIXED_KEY]], source=sampled[FIXED_KEY], resolve=False)
    else:
        cfg = space.trial_config(sampled)
    cfg.training.monitor, cfg.training.monitor_mode = space.metric, space.mode
    return cfg


def train_trial(sampled: dict[str, Any], *, space_dict: dict[str, Any], artifacts_root: str) -> None:
    """Ray Tune function trainable: fit() with a per-epoch ``tune.report`` carrying a ``tune.Checkpoint``.

    Only ``ray.tune`` APIs are used (``ray.train.*`` calls fail inside Tune trainables on current Ray).
    A restored trial (retry after a crash, or ``--resume``) continues from its last checkpoint.
    """
    import ray
    from ray import tune

    from medseg.training import fit

    space = SearchSpace.model_validate(space_dict)
    cfg = trial_config(sampled, space)
    ctx = tune.get_context()
    cpus = ctx.get_trial_resources().required_resources.get("CPU", 1)
    cfg.training.threads = max(1, int(cpus))  # torch threads = the trial's CPUs, no oversubscription
    if cfg.training.num_workers and cpus < 2:
        cfg.training.num_workers = 0
    run_dir = Path(artifacts_root) / ctx.get_trial_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            for name in ("last.pt", "best.pt"):
                if (Path(ckpt_dir) / name).exists():
                    shutil.copy2(Path(ckpt_dir) / name, run_dir / name)
        resume_state = run_dir / "last.pt"
    node_id = ray.get_runtime_context().get_node_id()

    def on_epoch(report) -> None:
        metrics = {k: v for k, v in report.metrics.items() if isinstance(v, (int, float))}
        metrics.update({OBJECTIVE: report.best_value, "best/epoch": report.best_epoch, "epoch": report.epoch,
                        "final": int(report.final), "epochs": cfg.training.epochs, "node_id": node_id,
                        "run_dir": str(run_dir)})
        with tempfile.TemporaryDirectory(prefix="medseg-ckpt-") as tmp:
            for name in ("last.pt", "best.pt"):
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, Path(tmp) / name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    fit(cfg, on_epoch=on_epoch, run_dir=run_dir, resume_state=resume_state, progress=False)


# -------------------------------------------------------------------------------------- MLflow callback


def _tune_callback_base():
    from ray import tune

    return tune.Callback


class MlflowTrialCallback(_tune_callback_base()):
    """Driver-side MLflow: a child run per trial, metrics per epoch, final status and artifacts.

    Holds only plain data (URI, ids), so Tune can pickle it into the experiment state; the client is
    re-created after a restore, and runs of restored trials are found again by their ``trial_id`` tag.
    """

    def __init__(self, *, uri: str, experiment_id: str, parent_run_id: str, study: str, space_dict: dict[str, Any],
                 artifacts_root: str, echo: bool = True):
        self.uri, self.experiment_id, self.parent_run_id, self.study = uri, experiment_id, parent_run_id, study
        self.space_dict, self.artifacts_root = space_dict, artifacts_root
        self.runs: dict[str, str] = {}
        self._client = None
        self.echo = echo

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from medseg.tracking import get_client

            self._client = get_client(self.uri)
        return self._client

    def _run_for(self, trial) -> str:
        from medseg.tracking import params_of, start_run, tags_of, tta_tag

        run_id = self.runs.get(trial.trial_id)
        if run_id:
            return run_id
        query = f"tags.trial_id = '{trial.trial_id}' and tags.study = '{self.study}'"
        found = self.client.search_runs([self.experiment_id], filter_string=query)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            space = SearchSpace.model_validate(self.space_dict)
            cfg = trial_config(trial.config, space)
            sampled = {k: v for k, v in trial.config.items()}
            tags = tags_of(cfg, kind="trial", study=self.study, trial_id=trial.trial_id,
                           sampled=json.dumps(sampled, default=str),
                           run_dir=str(Path(self.artifacts_root) / trial.trial_id), tta_axes=tta_tag(cfg))
            run_id = start_run(self.client, self.experiment_id, run_name=f"{self.study}-{trial.trial_id}",
                               params=params_of(cfg), tags=tags, parent_run_id=self.parent_run_id)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial failed and Tune retries it from its last checkpoint (``max_failures``): count and keep why."""
        run_id = self._run_for(trial)
        # counted in MLflow: survives a driver restore
        retries = int(self.client.get_run(run_id).data.tags.get("retries", "0")) + 1
        error = _trial_error(trial)
        self.client.set_tag(run_id, "retries", str(retries))
        self.client.set_tag(run_id, f"retry_{retries}_error", error[:5000])
        self._say(trial, f"failed, retrying from its last checkpoint (retry {retries}): {error[:300]}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from medseg.tracking import log_metrics

        metrics = {k: v for k, v in result.items() if k.startswith(LOGGED_PREFIXES) or k in LOGGED_KEYS}
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        log_metrics(self.client, self._run_for(trial), metrics, step=step)
        if "val/dice" in result:
            self._say(trial, f"epoch {result.get('epoch', '?')}/{result.get('epochs', '?')}  "
                             f"val/dice {result['val/dice']:.4f}  val/loss {result.get('val/loss', float('nan')):.4f}")

    def _say(self, trial, text: str) -> None:
        """One progress line per event on the driver's stdout (Tune's own table is off: verbose=0)."""
        if self.echo:
            params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
            print(f"[{self.study}] trial {trial.trial_id} ({params})  {text}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        """Normal end or a scheduler stop. A trial whose last report was not the trainer's final epoch was
        stopped early by ASHA: FINISHED, tagged ``stopped_early``, its curve drawn from history.json."""
        last = trial.last_result or {}
        status = close_trial_run(self.client, self._run_for(trial), Path(self.artifacts_root) / trial.trial_id, last)
        ended = "stopped early by ASHA" if status == "stopped_early" else "completed"
        self._say(trial, f"{ended} after {last.get('epoch', 0)} epochs, "
                         f"best {self.space_dict.get('metric', 'val/dice')} {last.get(OBJECTIVE, float('nan')):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        message = _trial_error(trial)
        self.client.set_tag(run_id, "tune_status", "failed")
        self.client.set_tag(run_id, "error", message[:5000])
        self.client.set_tag(run_id, "epochs_used", str((trial.last_result or {}).get("epoch", 0)))
        self.client.set_terminated(run_id, "FAILED")
        self._say(trial, f"FAILED: {message[:300]}")


def close_trial_run(client, run_id: str, run_dir: Path, last: dict[str, Any], stopped_by: str = "asha") -> str:
    """End a trial's run FINISHED with its artifacts and status tags; returns the status. A trial whose last report
    was not the trainer's final epoch stopped early: by ASHA (``stopped_early``) or by the study's time budget
    (``stopped_by_budget``: Tune stops those without calling the callback, so the driver closes them)."""
    from medseg.plots import learning_curve_png
    from medseg.tracking import log_run_artifacts

    stopped_early = not last.get("final", 0)
    status = "completed" if not stopped_early else ("stopped_by_budget" if stopped_by == "budget" else "stopped_early")
    history_file = Path(run_dir) / "history.json"
    if stopped_early and history_file.exists():
        learning_curve_png(json.loads(history_file.read_text()), Path(run_dir) / "learning_curve.png")
    client.set_tag(run_id, "stopped_early", str(bool(stopped_early)).lower())
    client.set_tag(run_id, "epochs_used", str(last.get("epoch", 0)))
    client.set_tag(run_id, "tune_status", status)
    log_run_artifacts(client, run_id, Path(run_dir))
    client.set_terminated(run_id, "FINISHED")
    return status


def _trial_error(trial) -> str:
    """The last line of a failed trial's error (its exception message), for tags and the report."""
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and attr == "error_file" and os.path.exists(path):
            lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1] if lines else "error"
    return str(getattr(trial, "error_msg", None) or "error")


# ----------------------------------------------------------------------------------------------- study


@dataclass
class StudyOutcome:
    name: str
    study_dir: Path
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # one record per trial (see _trial_records)
    best: dict[str, Any] | None = None
    seconds: float = 0.0
    warm_start: dict[str, Any] | None = None  # warmstart.WarmStart.summary() of the searcher, None without one


def resume_command(space: SearchSpace, name: str) -> str:
    """The command that continues this study: the same files and the same --set values."""
    import shlex

    parts = ["python", "tune.py"]
    if space.fixed_configs:
        parts += (["--space", space.settings_file] if space.settings_file else []) + ["--configs", *space.fixed_configs]
    else:
        parts += ["--space", space.source]
    for item in space.cli_overrides:
        parts += ["--set", item]
    return " ".join(shlex.quote(p) for p in parts + ["--resume", "--name", name])


# What a resumed study must share with the one it continues: what trials train and how they are scored.
RESUME_KEYS = ("base", "fixed_configs", "params", "overrides", "metric", "mode", "resources")


def resume_mismatch(started: dict[str, Any], space: SearchSpace) -> list[str]:
    """Dotted keys (with both values) where ``space`` differs from the stored space a study started with."""
    from medseg.config import flatten  # an empty mapping adds no key: {} and absent are the same

    now = json.loads(json.dumps(space.model_dump(), default=str))
    diffs = []
    for key in RESUME_KEYS:
        a, b = flatten({key: started.get(key)}), flatten({key: now.get(key)})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{k}: {a.get(k, '(absent)')!r} when started, {b.get(k, '(absent)')!r} now")
    return diffs


def new_study_name(space: SearchSpace) -> str:
    return f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_study(space: SearchSpace) -> str | None:
    """Name of the most recent unfinished study of this space under its storage path (for --resume)."""
    root = Path(space.storage_path)
    candidates = sorted(root.glob(f"{space.name}-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    unfinished = [p for p in candidates if _study_status(p) != "finished"]
    return unfinished[-1].parent.name if unfinished else None


def _study_status(state_path: Path) -> str | None:
    try:
        return json.loads(state_path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    # Per-epoch checkpoints with num_to_keep=1 trigger a snapshot warning on every report; the snapshots are wanted.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    # Workers import medseg from the project folder (also on other nodes sharing the file system).
    python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path, "PYTHONHASHSEED": "0"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False)


def _param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    if space.fixed_configs:
        return {FIXED_KEY: tune.grid_search(list(space.fixed_configs))}
    return {key: domain.to_tune() for key, domain in space.params.items()}


def _optuna_search_class():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class WarmOptunaSearch(_optuna_search_class()):
    """OptunaSearch told earlier trials (``points_to_evaluate`` + ``evaluated_rewards``) that still runs ``run_first``.

    With ``evaluated_rewards``, Ray 2.x adds every ``points_to_evaluate`` as a finished Optuna trial and enqueues
    none, so the space's own initial points (the base config, the file's ``points_to_evaluate``) are enqueued here,
    after the study exists (Tune creates it once the param space is known)."""

    def __init__(self, *, run_first: list[dict[str, Any]] | None = None, **kwargs):
        self._run_first = list(run_first or [])
        super().__init__(**kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        for point in self._run_first:
            self._ot_study.enqueue_trial(point)


def uses_searcher(space: SearchSpace) -> bool:
    return not space.fixed_configs and bool(space.params)


def _build_tuner(space: SearchSpace, trainable, callback, name: str, warm=None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search_alg = None
    if uses_searcher(space):
        from ray.tune.search.optuna import OptunaSearch

        if warm is not None and warm.points:  # earlier studies' trials: told, not re-run (medseg.warmstart)
            search_alg = WarmOptunaSearch(seed=space.optuna_seed, points_to_evaluate=warm.points,
                                          evaluated_rewards=warm.rewards, run_first=space.initial_points())
        else:
            search_alg = OptunaSearch(seed=space.optuna_seed, points_to_evaluate=space.initial_points() or None)
    if space.asha.enabled:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=space.asha.max_t,
                                  grace_period=space.asha.grace_period, reduction_factor=space.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(metric=OBJECTIVE, mode=space.mode, search_alg=search_alg, scheduler=scheduler,
                                  num_samples=1 if space.fixed_configs else space.num_samples,
                                  max_concurrent_trials=space.max_concurrent, time_budget_s=space.time_budget_s,
                                  trial_dirname_creator=lambda trial: trial.trial_id)
    run_config = tune.RunConfig(name=name, storage_path=space.storage_path, callbacks=[callback], verbose=0,
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                failure_config=tune.FailureConfig(max_failures=space.max_failures))
    return tune.Tuner(trainable, param_space=_param_space(space), tune_config=tune_config, run_config=run_config)


def _trainable(space: SearchSpace, artifacts_root: Path):
    from ray import tune

    fn = tune.with_parameters(train_trial, space_dict=space.model_dump(), artifacts_root=str(artifacts_root))
    return tune.with_resources(fn, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})


def _prepare_all(space: SearchSpace) -> str | None:
    """Build caches and splits on the driver, once, before trials start (trials then only read them).
    Returns the data fingerprint of the first config (the base config of a searched space)."""
    from medseg.training import prepare_data

    configs = list(space.fixed_configs.values()) or [space.base]
    fingerprints = [prepare_data(config_from_dict(raw, resolve=False), progress=True).source.fingerprint()
                    for raw in configs]
    return fingerprints[0] if fingerprints else None


@dataclass
class OpenStudy:
    """A study ready to run: where it lives, its MLflow parent run and the state kept in ``medseg_study.json``."""

    name: str
    study_dir: Path
    tracking_uri: str
    experiment_id: str
    client: Any
    state: dict[str, Any]  # name, parent_run_id, space, resume_command, status, warm_start, fit_seconds, best_trial
    resumed: bool = False

    @property
    def parent_run_id(self) -> str:
        return self.state["parent_run_id"]

    @property
    def artifacts_root(self) -> Path:
        return self.study_dir / "artifacts"

    def save(self) -> None:
        atomic_write_json(self.study_dir / STATE_FILE, self.state)


def run_study(space: SearchSpace, *, resume: bool = False, name: str | None = None, address: str | None = None,
              num_cpus: int | None = None, cold: bool = False) -> StudyOutcome:
    """Run (or resume) a study; returns the trial records. MLflow runs end with their final status.

    A new study's searcher is told the completed trials of earlier studies of the same searched keys, metric, mode
    and data (medseg.warmstart) unless ``cold`` (``tune.py --cold``). Steps: ``open_study``, ``run_tuner``,
    ``finish_study``."""
    started = time.perf_counter()
    study = open_study(space, resume=resume, name=name)
    try:
        grid = run_tuner(study, space, address=address, num_cpus=num_cpus, cold=cold)
    except BaseException:  # a second Ctrl-C (Tune did not get to save its state cleanly), a data error, a bad
        # --address, an error in the callback: no run stays RUNNING, and --resume can continue the study
        _mark_interrupted(study)
        raise
    return finish_study(study, space, grid, started=started)


def open_study(space: SearchSpace, *, resume: bool = False, name: str | None = None) -> OpenStudy:
    """A new study (parent MLflow run started, state file written), or with ``resume`` the named or latest
    unfinished one of the space, checked to be resumable with this space (its parent run RUNNING again)."""
    from medseg.tracking import default_tracking_uri, ensure_experiment, get_client

    uri = space.tracking_uri or default_tracking_uri()
    experiment_id = ensure_experiment(uri, space.experiment)  # once, on the driver, before any trial
    client = get_client(uri)
    if resume:
        name = name or latest_study(space)
        if not name:
            raise UsageError(f"--resume: no unfinished study of space '{space.name}' under {space.storage_path}")
    name = name or new_study_name(space)
    study_dir = Path(space.storage_path) / name
    if resume:
        state = _resumable_state(space, client, name, study_dir)
    else:
        state = _new_study_state(space, client, experiment_id, uri, name, study_dir)
    return OpenStudy(name=name, study_dir=study_dir, tracking_uri=uri, experiment_id=experiment_id, client=client,
                     state=state, resumed=resume)


def _resumable_state(space: SearchSpace, client, name: str, study_dir: Path) -> dict[str, Any]:
    """The stored state of a study to resume: Tune can restore it, it is not finished, and ``space`` trains and
    scores its trials as the space it started with did. Its parent run is RUNNING again."""
    from ray import tune

    state_path = study_dir / STATE_FILE
    if not state_path.exists() or not tune.Tuner.can_restore(str(study_dir)):
        raise UsageError(f"--resume: {study_dir} holds no resumable study")
    state = json.loads(state_path.read_text())
    if state.get("status") == "finished":
        raise UsageError(f"--resume: study {name} already finished (best trial {state.get('best_trial')}); "
                         "start a new study instead of resuming it")
    diffs = resume_mismatch(state.get("space", {}), space)
    if diffs:  # restored trials would train another config than the finished ones did
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        command = state.get("resume_command") or "the same --space/--configs and --set values"
        raise UsageError(f"--resume: {name}: the space differs from the one the study started with: {diffs[0]}{more}; "
                         f"continue it with: {command}")
    client.update_run(state["parent_run_id"], status="RUNNING")
    return state


def _new_study_state(space: SearchSpace, client, experiment_id: str, uri: str, name: str,
                     study_dir: Path) -> dict[str, Any]:
    """Start a new study's parent run and write its state file; returns the state."""
    from medseg.tracking import start_run, tags_of

    if study_dir.exists():
        raise UsageError(f"{study_dir}: a study with this name exists; use --resume or another --name")
    parent_run_id = start_run(client, experiment_id, run_name=name, params=_study_params(space),
                              tags=tags_of(space.base_cfg(), kind="study", study=name, space_file=space.source))
    state = {"name": name, "parent_run_id": parent_run_id, "experiment_id": experiment_id, "tracking_uri": uri,
             "space": space.model_dump(), "resume_command": resume_command(space, name), "status": "running"}
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(study_dir / STATE_FILE, state)
    return state


def _study_params(space: SearchSpace) -> dict[str, str]:
    """MLflow params of a study run: the domains and the study settings."""
    params = {"space." + k: json.dumps(v.model_dump(exclude_none=True)) for k, v in space.params.items()}
    return params | {"space.num_samples": str(space.num_samples), "space.metric": space.metric,
                     "space.asha": json.dumps(space.asha.model_dump()),
                     "space.max_concurrent": str(space.max_concurrent)}


def run_tuner(study: OpenStudy, space: SearchSpace, *, address: str | None = None, num_cpus: int | None = None,
              cold: bool = False):
    """Prepare the data on the driver, tell a new study's searcher earlier trials, then run a new tuner or restore
    the study's own; returns Tune's ResultGrid. The state adds up the seconds spent in ``Tuner.fit``."""
    from ray import tune

    fingerprint = _prepare_all(space)
    warm = None if study.resumed else _warm_start(study, space, fingerprint, cold)
    _init_ray(address, num_cpus)
    trainable = _trainable(space, study.artifacts_root)
    if study.resumed:  # the callback comes back with Tune's experiment state
        tuner = tune.Tuner.restore(str(study.study_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        callback = MlflowTrialCallback(uri=study.tracking_uri, experiment_id=study.experiment_id,
                                       parent_run_id=study.parent_run_id, study=study.name,
                                       space_dict=space.model_dump(), artifacts_root=str(study.artifacts_root))
        tuner = _build_tuner(space, trainable, callback, study.name, warm=warm)
    fit_started = time.monotonic()
    try:
        return tuner.fit()
    finally:  # Tune's time budget spans resumes (its stopper keeps the remaining budget), so the study's does too
        study.state["fit_seconds"] = float(study.state.get("fit_seconds", 0.0)) + time.monotonic() - fit_started


def _warm_start(study: OpenStudy, space: SearchSpace, fingerprint: str | None, cold: bool):
    """Earlier trials to tell a new study's searcher (medseg.warmstart), or None without a searcher; prints one line.
    Tags the study run with the data fingerprint (what a later study's warm start matches its trials' data on)
    and keeps the warm start's summary in the state."""
    from medseg.warmstart import WarmStart, collect

    if fingerprint:
        study.client.set_tag(study.parent_run_id, "dataset_fingerprint", fingerprint)
    warm = None
    if uses_searcher(space):
        warm = WarmStart(cold=True) if cold else collect(study.client, [study.experiment_id], space, study=study.name,
                                                         fingerprint=fingerprint)
        print(f"[{study.name}] {warm.note()}", flush=True)
    study.state["warm_start"] = warm.summary() if warm is not None else None
    study.save()
    return warm


def finish_study(study: OpenStudy, space: SearchSpace, grid, *, started: float) -> StudyOutcome:
    """After ``Tuner.fit``: close the runs the time budget stopped, stop with the resume command when the study was
    interrupted, build the trial records and pick the best; the state says finished. ``started``: perf_counter
    at the start of the study."""
    budget_spent = space.time_budget_s is not None and study.state["fit_seconds"] >= space.time_budget_s
    if budget_spent:
        _close_budget_stopped(study, grid)
    never_started = _check_not_interrupted(study, space, grid, budget_spent)
    trials = [t for t in _trial_records(grid, space, study) if t["trial_id"] not in never_started]
    _close_leftover_runs(study.client, study.experiment_id, study.name)
    best = _best_trial(trials, space.mode)
    outcome = StudyOutcome(name=study.name, study_dir=study.study_dir, parent_run_id=study.parent_run_id,
                           experiment_id=study.experiment_id, tracking_uri=study.tracking_uri, trials=trials, best=best,
                           seconds=time.perf_counter() - started, warm_start=study.state.get("warm_start"))
    study.state.update(status="finished", best_trial=best["trial_id"] if best else None)
    study.save()
    return outcome


def _check_not_interrupted(study: OpenStudy, space: SearchSpace, grid, budget_spent: bool) -> set[str]:
    """Raise (the study marked interrupted, the error naming the resume command) when a trial is unfinished;
    returns the trials that never started because the time budget ran out (they are no trials of the study).

    After a first Ctrl-C, Tune saves its state and returns normally: trials it stopped never reached the
    callback (their runs are still RUNNING), and trials not yet started are missing from the results."""
    runs = _study_runs(study.client, study.experiment_id, study.name)
    running = [r for r in runs if r.info.status == "RUNNING"]
    # a trial is done when the driver gave its run a final status tag; one created just before the Ctrl-C whose
    # worker never started has no run at all, yet counts among the results
    done = {r.data.tags.get("trial_id") for r in runs if r.data.tags.get("tune_status")}
    # ... except when the budget ran out: a trial created but not yet started then never will be
    with_run = {r.data.tags.get("trial_id") for r in runs}
    trial_ids = [_trial_id(result) for result in grid]
    never_started = {t for t in trial_ids if t not in with_run} if budget_spent else set()
    not_done = [t for t in trial_ids if t not in done and t not in never_started]
    expected = len(space.fixed_configs) or space.num_samples
    if running or not_done or (space.time_budget_s is None and len(grid) < expected):
        _mark_interrupted(study)
        raise RunInterrupted(f"study {study.name} interrupted ({len(grid)} of {expected} trials started, "
                             f"{len(not_done)} unfinished); continue it with: {resume_command(space, study.name)}")
    return never_started


def _best_trial(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The trial with the best finite ``best_value`` (max or min), failed trials left out; None without one."""
    finished = [t for t in trials if t["status"] != "failed" and t["best_value"] is not None
                and math.isfinite(t["best_value"])]
    if not finished:
        return None
    sign = 1 if mode == "max" else -1
    return max(finished, key=lambda t: sign * t["best_value"])


def _trial_id(result) -> str:
    """A Tune result's trial id: reported with every result, else its folder's name (trial_dirname_creator)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def _close_budget_stopped(study: OpenStudy, grid) -> None:
    """The time budget ran out: Tune stopped the running trials without calling the callback. Their runs end
    FINISHED with their artifacts, as trials stopped by the budget (not interrupted: --resume has nothing to add)."""
    running = {r.data.tags.get("trial_id"): r.info.run_id
               for r in _study_runs(study.client, study.experiment_id, study.name, status="RUNNING")}
    for result in grid:
        trial_id = _trial_id(result)
        if trial_id in running and result.error is None:
            close_trial_run(study.client, running[trial_id], study.artifacts_root / trial_id, result.metrics or {},
                            stopped_by="budget")


def _mark_interrupted(study: OpenStudy) -> None:
    """Runs of unfinished trials and the study run end KILLED (``--resume`` reopens them); state says so."""
    _close_leftover_runs(study.client, study.experiment_id, study.name)
    study.client.set_terminated(study.parent_run_id, "KILLED")
    study.state["status"] = "interrupted"
    study.save()


def _study_runs(client, experiment_id: str, study: str, status: str | None = None) -> list:
    """The MLflow runs of a study's trials (optionally only those with ``status``)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.study = '{study}' and tags.kind = 'trial'")
    return [r for r in runs if status is None or r.info.status == status]


def _close_leftover_runs(client, experiment_id: str, study: str) -> None:
    """Trial runs still RUNNING (interrupted, or a driver that died) end KILLED; --resume reopens them."""
    for run in _study_runs(client, experiment_id, study, status="RUNNING"):
        client.set_terminated(run.info.run_id, "KILLED")



def _trial_records(grid, space: SearchSpace, study: OpenStudy) -> list[dict[str, Any]]:
    """One dict per trial: id, run id, sampled params, best value, epochs used, status, checkpoint, history."""
    runs = {r.data.tags.get("trial_id"): r for r in _study_runs(study.client, study.experiment_id, study.name)}
    records = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = _trial_id(result)
        run_dir = study.artifacts_root / trial_id
        history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else []
        run = runs.get(trial_id)
        best_value = metrics.get(OBJECTIVE)
        planned = trial_config(result.config or {}, space).training.epochs  # what the trial would train left alone
        if space.asha.enabled:
            planned = min(planned, space.asha.max_t)
        sign = 1 if space.mode == "max" else -1
        best_row = max(history, key=lambda h: sign * h.get(space.metric, -math.inf)) if history else {}
        records.append({
            "trial_id": trial_id,
            "run_id": run.info.run_id if run else None,
            "params": {k: v for k, v in (result.config or {}).items()},
            "status": _trial_status(result, run),
            "error": str(result.error).strip().splitlines()[-1] if result.error is not None else None,
            "best_value": float(best_value) if isinstance(best_value, (int, float)) else None,
            "best_dice": best_row.get("val/dice"),
            "best_iou": best_row.get("val/iou"),
            "best_epoch": best_row.get("epoch"),
            "epochs_used": len(history),
            "epochs_planned": planned,
            "node_id": metrics.get("node_id"),
            "checkpoint": str(run_dir / "best.pt") if (run_dir / "best.pt").exists() else None,
            "history": [{k: h.get(k) for k in HISTORY_KEYS} for h in history],
        })
    return records


def _trial_status(result, run) -> str:
    """failed, completed (reached the trainer's final epoch), stopped_by_budget (closed so by the driver) or
    stopped_early (by ASHA)."""
    if result.error is not None:
        return "failed"
    if (result.metrics or {}).get("final"):
        return "completed"
    if run is not None and run.data.tags.get("tune_status") == "stopped_by_budget":
        return "stopped_by_budget"
    return "stopped_early"
