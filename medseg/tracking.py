"""MLflow adapter: tracking URI resolution, params/tags, run lifecycle, per-epoch logging and artifacts.

All calls go through ``MlflowClient`` with explicit run ids (no global "active run"), so the tuning driver
can own many runs at once and a trial never depends on process-global MLflow state.

Several processes may write to one embedded sqlite store at once (train.py runs, a study's driver, eval.py):
``get_client`` creates a new store's tables under a file lock beside it (MLflow's own first use races: every process
creates and migrates the schema, and all of them fail), and each call of the client it returns is retried with
backoff while the store is locked by another writer, ending in one ``TrackingStoreError`` line when it stays locked.
A tracking server that refuses connections (restarted, down) is waited for the same way, up to
``MEDSEG_TRACKING_SERVER_WAIT_S`` seconds (300), then one ``TrackingServerError`` line.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from medseg.config import Config, flatten
from medseg.errors import MedsegError, error_chain

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000
# Experiment kind read by MLflow 3's UI (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT): marks medseg's
# experiments as "Machine learning" (runs table, charts) rather than "GenAI apps & agents" (traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri(base: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an embedded sqlite store ``sqlite:///<abs cwd>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(base or os.getcwd()).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    return cfg.output.tracking_uri or default_tracking_uri()


def artifact_root_for(uri: str) -> str | None:
    """Absolute artifact root beside a local sqlite store (``mlartifacts/``); None lets a server decide."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def ui_command(uri: str, cwd: Path | None = None) -> str:
    """The command that opens the MLflow UI on ``uri``: ``make mlflow-ui`` only for the repository's own store
    (``<cwd>/mlflow.db`` with the Makefile beside it), else ``mlflow ui`` with the store and its artifact root."""
    here = Path(cwd or os.getcwd()).resolve()
    if uri == f"sqlite:///{here / 'mlflow.db'}" and (here / "Makefile").is_file():
        return "make mlflow-ui"
    if uri.startswith("sqlite:///"):
        root = Path(artifact_root_for(uri).removeprefix("file://"))
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {root} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def ui_url(experiment_id: str, *, uri: str | None = None, port: int = 5000) -> str:
    """The experiment's runs table in the UI that ``ui_command`` serves (a tracking server's own address when ``uri``
    is one). MLflow 3.17's UI opens an experiment in GenAI mode (its traces overview) whatever the experiment's
    ``mlflow.experimentKind`` tag says, unless the URL (or an earlier click on "Model training" in that browser) asks
    for the model-training mode."""
    base = uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


class TrackingStoreError(MedsegError):
    """The tracking store could not be used: locked by other writers through every retry, or its first-use set-up
    waited too long for another process. One line naming the store and what to do."""


LOCKED = ("database is locked", "database table is locked")  # sqlite's SQLITE_BUSY / SQLITE_LOCKED texts
LOCK_ATTEMPTS = 6  # tries of one MLflow write on a locked sqlite store (each waits up to MLflow's busy_timeout, 20 s)
# Reads get one try: a reader waits only while a writer commits (milliseconds), so one still locked after MLflow's 20 s
# means a connection holding the store exclusively, not contention; the writes are what must not be lost.
READ_ATTEMPTS = 1
READ_METHODS = ("get_", "search_", "list_", "download_")  # MlflowClient methods that only read
LOCK_BACKOFF_S = 0.5  # pause after the first locked try, doubled after each (with jitter)
SCHEMA_LOCK_TIMEOUT_S = 600.0  # wait for another process creating a new store's tables
_PREPARED: set[str] = set()  # sqlite stores whose tables this process has checked (created) under the file lock
_RETRY_JITTER = random.Random()  # its own generator: a retry never moves the seeded global one training relies on


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (``sqlite:////abs/path.db`` or a path relative to the
    working directory), None for any other store or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def store_locked(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is sqlite's "database is locked": another writer holds it."""
    return any(text in str(e) for e in error_chain(err) for text in LOCKED)


def call_with_retries(uri: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, tried again after a pause (0.5 s, doubled each time, with jitter) while the store is
    locked, ``LOCK_ATTEMPTS`` tries in all; then one ``TrackingStoreError`` line. Safe to repeat: a locked write was
    rolled back, nothing of it is in the store."""
    return _call_retried(uri, LOCK_ATTEMPTS, fn, args, kwargs)


def _call_retried(uri: str, attempts: int, fn: Callable, args: tuple, kwargs: dict):
    started, delay = time.monotonic(), LOCK_BACKOFF_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except TrackingStoreError:
            raise  # an inner call already retried and gave up
        except Exception as err:
            if server_unreachable(uri, err):
                waited = time.monotonic() - started
                if attempt == 1:
                    logging.getLogger(__name__).warning("%s: the tracking server does not answer; trying again for "
                                                        "up to %.0f s", uri, server_wait_s())
                if waited >= server_wait_s():
                    raise TrackingServerError(
                        f"{uri}: the tracking server did not answer (connection refused) for {waited:.0f} s, "
                        f"{attempt} tries; start it again on the same store and rerun (train.py: a new run; "
                        "tune.py --resume: finished trials are kept)") from None
                time.sleep(min(SERVER_PAUSE_MAX_S, delay * (0.5 + _RETRY_JITTER.random())))
                delay *= 2
                continue
            if not store_locked(err):
                raise
            if attempt >= attempts:
                tries = "1 try" if attempt == 1 else f"{attempt} tries"
                raise _locked_error_class()(
                    f"{uri}: the tracking store stayed locked by other processes (database is locked) after "
                    f"{tries} over {time.monotonic() - started:.0f} s; run fewer jobs against this sqlite store at "
                    "once, or point MLFLOW_TRACKING_URI at a tracking server") from None
            time.sleep(delay * (0.5 + _RETRY_JITTER.random()))
            delay *= 2


class TrackingServerError(TrackingStoreError):
    """A tracking server (``http(s)://``) refused connections through every retry (``MEDSEG_TRACKING_SERVER_WAIT_S``
    seconds): one line naming the server and what was kept. Not an ``MlflowException``: code that treats MLflow's
    errors as "nothing there" (no champion yet) must stop, not promote without its comparison."""


SERVER_WAIT_S = 300.0  # how long a call waits for a tracking server that refuses connections (a restart) by default
SERVER_PAUSE_MAX_S = 15.0  # longest pause between two tries of an unreachable server
UNREACHABLE = ("Failed to establish a new connection", "Connection refused", "Connection aborted",
               "RemoteDisconnected", "Connection reset by peer")


def server_wait_s() -> float:
    """``$MEDSEG_TRACKING_SERVER_WAIT_S`` (seconds) or ``SERVER_WAIT_S``."""
    try:
        return max(0.0, float(os.environ.get("MEDSEG_TRACKING_SERVER_WAIT_S", SERVER_WAIT_S)))
    except ValueError:
        return SERVER_WAIT_S


def server_unreachable(uri: str, err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a tracking server at ``uri`` not answering: the request
    never reached it (connection refused, reset or aborted), so trying it again cannot write twice."""
    if not uri.startswith(("http://", "https://")):
        return False
    return any(text in str(e) for e in error_chain(err) for text in UNREACHABLE)


@functools.cache
def _locked_error_class() -> type[TrackingStoreError]:
    """``TrackingStoreError`` that is also an ``MlflowException`` (TEMPORARILY_UNAVAILABLE, as MLflow answers a locked
    store), so that code handling MLflow's own error (e.g. ``registry.current_champion``: never "no champion") still
    does. Made on first use: importing mlflow takes seconds that importing medseg.tracking does not."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    except ImportError:
        return TrackingStoreError

    def init(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=TEMPORARILY_UNAVAILABLE)

    return type("TrackingStoreLockedError", (TrackingStoreError, MlflowException),
                {"__init__": init, "__module__": __name__, "__str__": lambda self: str(self.message)})


class _LockedStoreLogFilter(logging.Filter):
    """Drops MLflow's logged traceback of a "database is locked" error: ``call_with_retries`` retries the call and,
    if the store stays locked, says so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not any(locked in text for locked in LOCKED)


class _UnreachableServerLogFilter(logging.Filter):
    """Drops urllib3's warning for each retry of a refused connection: ``_call_retried`` says once that it waits for
    the server and, if it never answers, ends in one ``TrackingServerError`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in UNREACHABLE)


@functools.cache
def _retrying_client_class():
    """``MlflowClient`` whose public methods go through ``call_with_retries`` (the reads with ``READ_ATTEMPTS``)."""
    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.db.utils").addFilter(_LockedStoreLogFilter())
    logging.getLogger("urllib3.connectionpool").addFilter(_UnreachableServerLogFilter())

    def retried(name, method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            attempts = READ_ATTEMPTS if name.startswith(READ_METHODS) else LOCK_ATTEMPTS
            return _call_retried(self._medseg_uri, attempts, method, (self, *args), kwargs)

        return call

    def reduce(self):  # pickled (a Ray callback, a copy): a new client of the same store
        return get_client, (self._medseg_uri,)

    methods = {name: retried(name, attr) for name, attr in vars(MlflowClient).items()
               if not name.startswith("_") and inspect.isfunction(attr)}
    return type("RetryingMlflowClient", (MlflowClient,), {**methods, "__module__": __name__, "__reduce__": reduce})


def prepare_store(uri: str) -> None:
    """Create a new sqlite store's tables once, under a file lock beside it (``<db>-schema.lock``), before this
    process uses it: MLflow creates and migrates them on a process's first use, and processes starting together on a
    fresh store would all do it at once and fail ("table experiments already exists", a failed migration). Other
    stores (a server) and stores this process already prepared: nothing to do."""
    path = sqlite_path(uri)
    if path is None or uri in _PREPARED:
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{path}-schema.lock", timeout=SCHEMA_LOCK_TIMEOUT_S):
            client = _new_client(uri)  # MlflowClient opens the tracking store at once: tables created, migrated
            client.search_registered_models(max_results=1)  # the registry store on the same database
    except Timeout:
        raise TrackingStoreError(f"{uri}: another process has held {path}-schema.lock (creating the store's "
                                 f"tables) for {SCHEMA_LOCK_TIMEOUT_S:.0f} s; let it finish or stop it, and run "
                                 "again") from None
    _PREPARED.add(uri)


def get_client(uri: str):
    """An ``MlflowClient`` for ``uri`` (tracking and registry) whose calls are retried while a sqlite store is locked
    (``call_with_retries``); a new sqlite store gets its tables first (``prepare_store``)."""
    prepare_store(uri)
    return _new_client(uri)


def _new_client(uri: str):
    client = call_with_retries(uri, _retrying_client_class(), tracking_uri=uri, registry_uri=uri)
    client._medseg_uri = uri
    return client


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, created (with an absolute artifact root) if missing; a process that loses the race
    to create it (another created it meanwhile) gets the other's. A new sqlite store's tables are created by
    ``get_client`` under its file lock.

    New experiments get ``mlflow.experimentKind = custom_model_development``; an existing active experiment
    without that tag (an older store) gets it too, but a kind already set (by a user, in the UI) is kept."""
    from mlflow.exceptions import MlflowException

    client = get_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root_for(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags and exp.lifecycle_stage == "active":
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException as err:  # a UI hint only (e.g. a read-only server): never fail a run for it
            logging.getLogger(__name__).warning("could not tag experiment %r with %s: %s", name, EXPERIMENT_KIND_TAG,
                                                err)
    return exp.experiment_id


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def params_of(cfg: Config) -> dict[str, str]:
    """The flattened resolved config as MLflow params (same keys for train.py runs and tuning trials)."""
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(cfg.to_dict()).items()}


def tags_of(cfg: Config, data=None, **extra: str) -> dict[str, str]:
    from medseg.machine import host_description
    from medseg.models import training_precision

    tags = {"git_commit": git_commit(), "config_hash": cfg.hash(), "config_name": cfg.name, "host": host_description(),
            # training.precision resolved on this host (auto: bf16 where the CPU or GPU has it)
            "precision": training_precision(cfg.training)}
    if data is not None:
        tags.update(dataset=str(Path(data.source.root).name), dataset_fingerprint=data.source.fingerprint(),
                    split_hash=data.split.hash, split_fold=str(data.split.fold),
                    preprocessing_hash=Path(data.cache.root).name)
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


def tta_tag(cfg: Config) -> str:
    """The ``tta_axes`` tag of a training run: the mirrors its augmentation flipped (``medseg.tta``), e.g. "[[3]]"."""
    from medseg.tta import format_mirrors, mirrors_from_augment

    return format_mirrors(mirrors_from_augment(cfg.augment))


def start_run(client, experiment_id: str, *, run_name: str, params: dict[str, str], tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    from mlflow.entities import Param

    if parent_run_id:
        tags = {**tags, PARENT_TAG: parent_run_id}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(k, v) for k, v in params.items()]
    try:
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run.info.run_id, params=items[i:i + 100])
    except BaseException as err:
        client.set_terminated(run.info.run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return run.info.run_id


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Numeric metrics at ``step`` (the epoch); non-finite values are skipped, not logged as NaN."""
    import math

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if items:
        client.log_batch(run_id, metrics=items)


def log_run_artifacts(client, run_id: str, run_dir: Path) -> None:
    """Best checkpoint, curves, overlays, resolved config, splits.json and per-case CSV of a run folder."""
    run_dir = Path(run_dir)
    for name, dest in (("best.pt", "checkpoint"), ("config.yaml", None), ("splits.json", None),
                       ("val_per_case.csv", None), ("history.json", None), ("learning_curve.png", "plots")):
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name), dest)
    if (run_dir / "overlays").is_dir():
        client.log_artifacts(run_id, str(run_dir / "overlays"), "plots/overlays")
    log_postprocessing(client, run_id, run_dir)


def log_postprocessing(client, run_id: str, run_dir: Path) -> None:
    """The post-processing chosen after training (``postprocessing.json`` of the run folder): artifact, tag
    ``postprocessing`` (one line) and metrics ``val/dice_before_postprocessing``, ``val/dice_postprocessed`` (validation
    at the cached resolution, step = best epoch)."""
    import json

    from medseg.postprocess import describe

    path = Path(run_dir) / "postprocessing.json"
    if not path.exists():
        return
    choice = json.loads(path.read_text())
    client.log_artifact(run_id, str(path))
    client.set_tag(run_id, "postprocessing", describe(choice)[:5000])
    log_metrics(client, run_id, {"val/dice_before_postprocessing": choice["dice_before"],
                                 "val/dice_postprocessed": choice["dice_after"],
                                 "postprocessing_seconds": choice.get("seconds", float("nan"))},
                step=int(choice.get("epoch", 0)))


@contextmanager
def tracked_run(client, run_id: str) -> Iterator[str]:
    """End the run FINISHED on success, KILLED on Ctrl-C, FAILED (with the error as a tag) otherwise."""
    try:
        yield run_id
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except TrackingServerError:
        raise  # the server stopped answering through every retry: the run's end cannot be written there either
    except BaseException as err:
        try:
            client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        finally:  # a failing tag write (a locked store) must not leave the run RUNNING
            client.set_terminated(run_id, "FAILED")
        raise
    else:
        client.set_terminated(run_id, "FINISHED")


def train_tracked(cfg: Config, *, progress: bool = True) -> tuple[Any, str]:
    """train.py's job: prepare data, open an MLflow run, fit with per-epoch logging, log artifacts.

    Returns (FitResult, run_id). Failures end the run FAILED and re-raise.
    """
    from medseg.training import fit, prepare_data

    uri = tracking_uri(cfg)
    client = get_client(uri)
    experiment_id = ensure_experiment(uri, cfg.output.experiment)
    data = prepare_data(cfg, progress=progress)
    run_name = cfg.output.run_name or cfg.name
    run_id = start_run(client, experiment_id, run_name=run_name, params=params_of(cfg),
                       tags=tags_of(cfg, data, kind="train", tta_axes=tta_tag(cfg)))
    run_dir = Path(cfg.output.run_dir) / f"{run_name}-{run_id[:8]}"
    with tracked_run(client, run_id):
        client.set_tag(run_id, "run_dir", str(run_dir))

        def on_epoch(report) -> None:
            log_metrics(client, run_id, report.metrics, step=report.epoch)

        result = fit(cfg, on_epoch=on_epoch, run_dir=run_dir, data=data, progress=progress,
                     checkpoint_meta={"mlflow_run_id": run_id})
        log_metrics(client, run_id, {f"best/{k}": v for k, v in result.best_metrics.items()}, step=result.best_epoch)
        client.set_tag(run_id, "best_epoch", str(result.best_epoch))
        client.set_tag(run_id, "stop_reason", result.stop_reason)
        log_run_artifacts(client, run_id, result.run_dir)
    return result, run_id


def find_training_run(client, experiment_ids: list[str], checkpoint: Path, meta: dict) -> str | None:
    """The MLflow run that produced a checkpoint: its id in the checkpoint (train.py), else the run whose
    ``run_dir`` tag is the checkpoint's folder (tuning trials)."""
    if meta.get("mlflow_run_id"):
        return str(meta["mlflow_run_id"])
    run_dir = str(Path(checkpoint).resolve().parent)
    runs = client.search_runs(experiment_ids, filter_string=f"tags.run_dir = '{run_dir}'", max_results=1)
    return runs[0].info.run_id if runs else None
