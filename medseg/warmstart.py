"""Warm starts: completed trials of earlier studies, read from the MLflow tracking store, told to Optuna.

Pure selection over MLflow runs and the search space (no Ray): ``collect`` returns the points and their rewards
that ``tuning.run_study`` hands to ``OptunaSearch(points_to_evaluate=..., evaluated_rewards=...)``, so Optuna's
sampler starts from what earlier studies already measured without re-running them.

An earlier trial run (tags ``kind=trial``, ``study``, ``sampled``) is used when
  - its study is not the current one (a resumed study never feeds itself),
  - it completed (``tune_status=completed``: an ASHA-stopped or failed trial's running best is not its result),
  - it was scored on the same metric and mode (its params ``training.monitor`` / ``training.monitor_mode``),
  - it sampled exactly the searched keys of the current space, each value inside the current domain,
  - its data fingerprint (tag ``dataset_fingerprint`` on the trial run, else on its study run) equals the current one,
  - its metric history of ``space.metric`` has a finite value; the reward is the best one (by ``space.mode``).
Everything else is skipped and counted by reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SKIP_REASONS = ("not completed", "other metric or mode", "other parameters", "outside the domain", "other data",
                "no metric")


@dataclass
class WarmStart:
    points: list[dict[str, Any]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    from_studies: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    cold: bool = False

    def summary(self) -> dict[str, Any]:
        """What the study report stores under ``warm_start``."""
        return {"used": len(self.points), "skipped": sum(self.skipped.values()),
                "from_studies": list(self.from_studies), "skipped_by_reason": dict(self.skipped), "cold": self.cold}

    def note(self) -> str:
        return note(self.summary())


def note(summary: dict[str, Any] | None) -> str:
    """One line for the study output and the report."""
    if not summary:
        return "warm start: none"
    if summary.get("cold"):
        return "warm start: off (--cold)"
    reasons = ", ".join(f"{n} {r}" for r, n in (summary.get("skipped_by_reason") or {}).items() if n)
    studies = ", ".join(summary.get("from_studies") or []) or "none"
    return (f"warm start: {summary['used']} earlier trials told to Optuna (from {studies}); "
            f"{summary['skipped']} skipped" + (f" ({reasons})" if reasons else ""))


def fits_domain(domain, value: Any) -> bool:
    """``value`` is a valid sample of ``domain`` (a search_space.Domain): inside its bounds, of its type."""
    if domain.type == "choice":
        return value in domain.values
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if domain.type == "int" and value != int(value):
        return False
    return domain.contains(value)


def _coerce(domain, value: Any) -> Any:
    """Sampled values are stored as JSON with ``default=str``: numbers that were numpy scalars come back as text."""
    if isinstance(value, str) and domain.type != "choice":
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if domain.type == "int" and number == int(number) else number
    if domain.type == "int" and isinstance(value, float) and value == int(value):
        return int(value)
    return value


def best_value(client, run_id: str, metric: str, mode: str) -> float | None:
    """Best finite value of ``metric`` in the run's history (max or min), or None."""
    values = [m.value for m in client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def trial_runs(client, experiment_ids: list[str]) -> list:
    """All finished trial runs of the experiments (every page)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids,
                                  filter_string="tags.kind = 'trial' and attributes.status = 'FINISHED'",
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_fingerprint(client, run, cache: dict[str, str | None]) -> str | None:
    """The run's ``dataset_fingerprint`` tag, else its parent (study) run's."""
    own = run.data.tags.get("dataset_fingerprint")
    if own:
        return own
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    if parent not in cache:
        cache[parent] = client.get_run(parent).data.tags.get("dataset_fingerprint")
    return cache[parent]


def skip_reason(run, space, study: str) -> str | None:
    """Why ``run`` cannot warm-start ``space`` (checks that need no further store reads), or None."""
    tags, params = run.data.tags, run.data.params
    if tags.get("tune_status") != "completed":
        return "not completed"
    if (params.get("training.monitor"), params.get("training.monitor_mode")) != (space.metric, space.mode):
        return "other metric or mode"
    point = sampled_point(run, space)
    if point is None:
        return "other parameters"
    if not all(fits_domain(space.params[k], v) for k, v in point.items()):
        return "outside the domain"
    return None


def sampled_point(run, space) -> dict[str, Any] | None:
    """The run's sampled values when they are exactly the space's searched keys (values coerced), else None."""
    try:
        sampled = json.loads(run.data.tags.get("sampled") or "")
    except ValueError:
        return None
    if not isinstance(sampled, dict) or set(sampled) != set(space.params):
        return None
    return {k: _coerce(space.params[k], v) for k, v in sampled.items()}


def select(client, runs: list, space, *, study: str, fingerprint: str | None) -> WarmStart:
    """The earlier trials among ``runs`` that can warm-start ``space`` for the study named ``study``."""
    warm = WarmStart(skipped={r: 0 for r in SKIP_REASONS})
    studies: set[str] = set()
    parents: dict[str, str | None] = {}
    for run in runs:
        if run.data.tags.get("study") == study:
            continue  # the current study (--resume): its trials are Tune's own business
        reason = skip_reason(run, space, study)
        if reason is None and (fingerprint is None or run_fingerprint(client, run, parents) != fingerprint):
            reason = "other data"
        reward = None
        if reason is None:
            reward = best_value(client, run.info.run_id, space.metric, space.mode)
            reason = "no metric" if reward is None else None
        if reason is not None:
            warm.skipped[reason] += 1
            continue
        warm.points.append(sampled_point(run, space))
        warm.rewards.append(reward)
        studies.add(run.data.tags.get("study", "?"))
    warm.from_studies = sorted(studies)
    warm.skipped = {r: n for r, n in warm.skipped.items() if n}
    return warm


def collect(client, experiment_ids: list[str], space, *, study: str, fingerprint: str | None) -> WarmStart:
    """``select`` over every finished trial run of the experiments."""
    return select(client, trial_runs(client, experiment_ids), space, study=study, fingerprint=fingerprint)
