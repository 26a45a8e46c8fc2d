"""``tune.py --space SPACE --improve``: one scheduled step of the improvement loop (cron, CI).

Steps, each a function below, all under a per-space lock (``<storage_path>/improve-<space>.lock``):

1. ``audit_data``: the audit of ``python -m medseg.data check`` on the space's base config; hard errors stop here
   (exit 1);
2. ``change_key`` / ``unchanged``: (data fingerprint, hash of the validated space, code commit) against the key of the
   last completed improve run of this space (``<storage_path>/improve-<space>.json``); the same key stops here (exit 0)
   unless ``force``;
3. ``with_budget`` + ``study.run_and_promote``: a warm-started study under a time budget, judged against the champion,
   reported;
4. ``record``: the key of the completed run, written atomically (and tagged ``improve_key`` on the study run).

Exit codes (``medseg.cli``'s contract): 0 done (promoted or not: the decision is in the report and MLflow) or nothing
changed; 1 hard data errors or a failed job; 2 a bad command line or config; ``EXIT_LOCKED`` (75, sysexits'
EX_TEMPFAIL) another improve run of the same space holds the lock.

The JSON file is the source of truth for "last decision": it sits next to the lock under the space's
``storage_path``, is read without querying the tracking store, and is written only after ``run_and_promote``
returned (a failed or interrupted run records nothing, so the next scheduled run tries again). The MLflow tag is for
people browsing runs.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medseg.cli import EXIT_DATA_ERRORS as EXIT_AUDIT
from medseg.cli import EXIT_LOCKED  # EX_TEMPFAIL: a scheduler may retry later; distinct from success and failure

DEFAULT_BUDGET_S = 1800.0
LOCK_TIMEOUT_S = 5.0
# Fields of a validated space that do not change what a study trains or how it is judged: where it was loaded from,
# how (--set values, --budget-s), and the budget itself (a time limit, not a different study).
VOLATILE_FIELDS = {"source", "cli_overrides", "settings_file", "description", "time_budget_s"}


@dataclass(frozen=True)
class ChangeKey:
    data: str
    space: str
    code: str

    def diff(self, other: "ChangeKey | None") -> list[str]:
        """What changed from ``other`` (the last recorded key), in words."""
        if other is None:
            return ["no earlier improve run of this space"]
        names = {"data": "data fingerprint", "space": "search space", "code": "code commit"}
        return [f"{names[f]} changed ({getattr(other, f)} -> {getattr(self, f)})" for f in names
                if getattr(self, f) != getattr(other, f)]


def paths(space) -> tuple[Path, Path]:
    """(state file, lock file) of a space's improve runs."""
    root = Path(space.storage_path)
    return root / f"improve-{space.name}.json", root / f"improve-{space.name}.lock"


def space_hash(space) -> str:
    from medseg.io_utils import stable_hash

    return stable_hash(space.model_dump(exclude=VOLATILE_FIELDS))


def change_key(space, fingerprint: str, commit: str | None = None) -> ChangeKey:
    from medseg.tracking import git_commit

    return ChangeKey(data=fingerprint, space=space_hash(space), code=commit if commit is not None else git_commit())


def last_record(state_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(state_path).read_text())
    except (OSError, ValueError):
        return None


def last_key(record: dict[str, Any] | None) -> ChangeKey | None:
    try:
        return ChangeKey(**record["key"]) if record else None
    except (KeyError, TypeError):
        return None


def unchanged(key: ChangeKey, record: dict[str, Any] | None) -> bool:
    return last_key(record) == key


def base_config_path(space) -> Path:
    return (Path(space.source).parent / space.base_config).resolve()


def audit_data(space) -> tuple[dict[str, Any], str | None]:
    """The data audit of the space's base config (overrides applied); returns (report, message if hard errors)."""
    from medseg.data.check import audit

    report = audit(space.base_cfg().dataset)
    errors = report["errors"]
    if not errors:
        return report, None
    first = errors[0]
    return report, (f"improve: data audit found {len(errors)} hard error(s), no study run; first: [{first['kind']}] "
                    f"{first['message']}; full report: python -m medseg.data check --config {base_config_path(space)}")


def data_fingerprint(space) -> str:
    from medseg.data.sources import open_source_from_config

    return open_source_from_config(space.base_cfg().dataset).fingerprint()


def with_budget(space, budget_s: float | None):
    """The space with ``time_budget_s`` set as ``--set time_budget_s=...`` would (and in its resume command)."""
    budget = float(budget_s or space.time_budget_s or DEFAULT_BUDGET_S)
    sets = [o for o in space.cli_overrides if not o.startswith("time_budget_s=")] + [f"time_budget_s={budget:g}"]
    return space.updated(time_budget_s=budget, cli_overrides=sets)


def record(state_path: Path, key: ChangeKey, outcome, decision) -> dict[str, Any]:
    from medseg.io_utils import atomic_write_json
    from medseg.tracking import get_client

    rec = {"key": asdict(key), "study": outcome.name, "study_run_id": outcome.parent_run_id,
           "decision": decision.alias if decision is not None else None,
           "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(state_path, rec)
    try:
        get_client(outcome.tracking_uri).set_tag(outcome.parent_run_id, "improve_key",
                                                 json.dumps(asdict(key), sort_keys=True))
    except Exception:  # informative only: the file is the source of truth
        pass
    return rec


def improve(space, *, force: bool = False, budget_s: float | None = None, address: str | None = None,
            num_cpus: int | None = None, cold: bool = False, lock_timeout: float = LOCK_TIMEOUT_S,
            progress: bool = True) -> int:
    """One improve step (module doc); returns the exit code."""
    from filelock import FileLock, Timeout

    state_path, lock_path = paths(space)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=lock_timeout)
    try:
        lock.acquire()
    except Timeout:
        print(f"improve: another improve run of space '{space.name}' holds {lock_path}; not started "
              f"(exit {EXIT_LOCKED})", flush=True)
        return EXIT_LOCKED
    try:
        return _improve_locked(space, state_path, force=force, budget_s=budget_s, address=address, num_cpus=num_cpus,
                               cold=cold, progress=progress)
    finally:
        lock.release()


def _improve_locked(space, state_path: Path, *, force, budget_s, address, num_cpus, cold, progress) -> int:
    from medseg.study import run_and_promote

    _, failed = audit_data(space)
    if failed:
        print(failed, flush=True)
        return EXIT_AUDIT
    key = change_key(space, data_fingerprint(space))
    previous = last_record(state_path)
    if unchanged(key, previous) and not force:
        print(f"improve: nothing changed since the last decision of space '{space.name}' "
              f"(study {previous.get('study')}, {previous.get('decision')}, {previous.get('decided_at')}): "
              "same data fingerprint, search space and code commit; --force runs anyway", flush=True)
        return 0
    why = "--force" if force and unchanged(key, previous) else "; ".join(key.diff(last_key(previous)))
    space = with_budget(space, budget_s)
    print(f"improve: running a study of space '{space.name}' (budget {space.time_budget_s:g} s): {why}", flush=True)
    outcome, decision, _ = run_and_promote(space, address=address, num_cpus=num_cpus, cold=cold, progress=progress)
    rec = record(state_path, key, outcome, decision)
    print(f"improve: study {outcome.name} decided {rec['decision'] or 'nothing (no trial to judge)'}; key recorded in "
          f"{state_path}", flush=True)
    return 0
