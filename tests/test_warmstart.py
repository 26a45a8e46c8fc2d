"""Warm starts: the selection of earlier trials over a real sqlite MLflow store, the searcher that is told them, and
two real studies on a local Ray (the second picks up the first's trials; --cold does not)."""
from __future__ import annotations

import json

import pytest

from medseg.search_space import SearchSpace
from medseg.tracking import get_client
from medseg.warmstart import collect, fits_domain, note

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FP = "fp-current"


def _space_obj(**fields) -> SearchSpace:
    doc = {"name": "w", "base_config": "base.yaml", "metric": "val/loss", "mode": "min",
           "params": {"training.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                      "loss.name": {"type": "choice", "values": ["bce_dice", "dice"]}}}
    doc.update(fields)
    return SearchSpace.model_validate(doc)


def _trial(client, experiment_id, parent_id, study, sampled, history, *, metric="val/loss", mode="min",
           status="completed", fingerprint=None):
    tags = {"kind": "trial", "study": study, "sampled": json.dumps(sampled), "tune_status": status,
            "mlflow.parentRunId": parent_id}
    if fingerprint:
        tags["dataset_fingerprint"] = fingerprint
    run = client.create_run(experiment_id, tags=tags)
    client.log_param(run.info.run_id, "training.monitor", metric)
    client.log_param(run.info.run_id, "training.monitor_mode", mode)
    for step, value in enumerate(history, 1):
        client.log_metric(run.info.run_id, metric, value, step=step)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _study(client, experiment_id, name, fingerprint):
    run = client.create_run(experiment_id, tags={"kind": "study", "study": name, "dataset_fingerprint": fingerprint})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_selection_over_a_real_store(tmp_path):
    client = get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = client.create_experiment("warm")
    old, other_data, current = (_study(client, eid, n, fp)
                                for n, fp in (("old", FP), ("other-data", "fp-else"), ("now", FP)))
    ok = {"training.lr": 0.003, "loss.name": "dice"}
    _trial(client, eid, old, "old", ok, [0.9, 0.5, 0.7])                                   # used: best (min) 0.5
    # used: own tag
    _trial(client, eid, old, "old", {"training.lr": 0.001, "loss.name": "bce_dice"}, [0.6], fingerprint=FP)
    _trial(client, eid, old, "old", ok, [0.4], metric="val/dice", mode="max")              # other metric
    _trial(client, eid, old, "old", ok, [0.4], mode="max")                                 # other mode
    _trial(client, eid, old, "old", {"training.lr": 0.003}, [0.4])                         # other parameter set
    _trial(client, eid, old, "old", {**ok, "model.arch": "Unet"}, [0.4])                   # other parameter set
    _trial(client, eid, old, "old", {"training.lr": 0.5, "loss.name": "dice"}, [0.4])      # lr outside the domain
    _trial(client, eid, old, "old", {"training.lr": 0.003, "loss.name": "focal"}, [0.4])   # choice outside the domain
    _trial(client, eid, other_data, "other-data", ok, [0.4])                               # other fingerprint (study)
    _trial(client, eid, old, "old", ok, [0.4], fingerprint="fp-else")                      # other fingerprint (own tag)
    _trial(client, eid, old, "old", ok, [0.3], status="stopped_early")                     # not completed
    _trial(client, eid, current, "now", ok, [0.1])                                         # the current study: never
    running = client.create_run(eid, tags={"kind": "trial", "study": "old", "sampled": json.dumps(ok),
                                           "tune_status": "completed"})

    warm = collect(client, [eid], _space_obj(), study="now", fingerprint=FP)
    assert sorted(zip(warm.rewards, [p["training.lr"] for p in warm.points])) == [(0.5, 0.003), (0.6, 0.001)]
    assert all(set(p) == {"training.lr", "loss.name"} for p in warm.points)
    assert warm.from_studies == ["old"]
    assert warm.skipped == {"other metric or mode": 2, "other parameters": 2, "outside the domain": 2, "other data": 2,
                            "not completed": 1}
    summary = warm.summary()
    assert (summary["used"], summary["skipped"], summary["from_studies"]) == (2, 9, ["old"])
    assert "2 earlier trials told to Optuna (from old); 9 skipped" in note(summary)
    assert running.info.run_id  # RUNNING (unfinished) runs are not read at all

    # mode max on the same history: the best is the largest value; an unknown current fingerprint uses nothing
    by_max = collect(client, [eid], _space_obj(metric="val/dice", mode="max"), study="now", fingerprint=FP)
    assert by_max.rewards == [0.4]
    assert collect(client, [eid], _space_obj(), study="now", fingerprint=None).points == []
    # a narrower domain leaves the earlier lr 0.001 outside it
    narrow = _space_obj(params={"training.lr": {"type": "loguniform", "low": 0.002, "high": 0.01},
                                "loss.name": {"type": "choice", "values": ["bce_dice", "dice"]}})
    assert [p["training.lr"] for p in collect(client, [eid], narrow, study="now", fingerprint=FP).points] == [0.003]


def test_fits_domain_types():
    space = SearchSpace.model_validate({"name": "w", "base_config": "b.yaml", "params": {
        "training.batch_size": {"type": "int", "low": 2, "high": 8},
        "training.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}})
    bs, lr = space.params["training.batch_size"], space.params["training.lr"]
    assert fits_domain(bs, 4) and not fits_domain(bs, 4.5) and not fits_domain(bs, 9) and not fits_domain(bs, True)
    assert fits_domain(lr, 0.15) and not fits_domain(lr, "0.15") and not fits_domain(lr, float("nan"))


def test_searcher_is_told_earlier_trials_and_still_runs_the_initial_points():
    from optuna.trial import TrialState
    from ray import tune

    from medseg.tuning import WarmOptunaSearch

    searcher = WarmOptunaSearch(seed=0, points_to_evaluate=[{"lr": 0.001}, {"lr": 0.005}], evaluated_rewards=[0.7, 0.4],
                                run_first=[{"lr": 0.003}])
    assert searcher.set_search_properties("objective", "min", {"lr": tune.loguniform(1e-4, 1e-2)})
    trials = searcher._ot_study.trials
    assert [(t.state, t.value, t.params) for t in trials if t.state == TrialState.COMPLETE] == [
        (TrialState.COMPLETE, 0.7, {"lr": 0.001}), (TrialState.COMPLETE, 0.4, {"lr": 0.005})]
    assert searcher.suggest("t1") == {"lr": 0.003}  # the base point is run first, the told ones are not re-run
    assert 1e-4 <= searcher.suggest("t2")["lr"] <= 1e-2


@pytest.mark.slow  # ~1 min: in make test-slow, so that make test stays near its time budget
def test_second_study_is_warm_started_and_cold_is_not(tmp_path, synth_root, shared_cache, monkeypatch):
    import ray

    from medseg.report import write_study_report
    from medseg.search_space import load_space
    from medseg.tuning import run_study
    from tests.test_tuning import _space, _write_base

    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}})
    try:
        base = _write_base(tmp_path, synth_root, shared_cache,
                           training={"epochs": 1, "lr": 0.003, "samples_per_epoch": 32})
        space = load_space(_space(tmp_path, base,
                                  params={"training.lr": {"type": "loguniform", "low": 1e-4, "high": 0.01}},
                                  asha={"max_t": 1, "grace_period": 1}))
        first = run_study(space, name="first")
        assert first.warm_start["used"] == 0 and [t["status"] for t in first.trials] == ["completed", "completed"]
        second = run_study(space, name="second")
        report = json.loads(write_study_report(second, space)["json"].read_text())
        assert report["warm_start"]["used"] == 2 and report["warm_start"]["from_studies"] == ["first"]
        second_report = (tmp_path / "reports" / "second.md").read_text()
        assert "Warm start: 2 earlier trials told to Optuna (from first)" in second_report
        assert len(second.trials) == 2  # told trials are not re-run: the study still trains num_samples trials
        client = get_client(second.tracking_uri)
        assert client.get_run(second.parent_run_id).data.tags["dataset_fingerprint"]
        cold = run_study(space, name="cold", cold=True)  # tune.py --cold
        assert cold.warm_start == {"used": 0, "skipped": 0, "from_studies": [], "skipped_by_reason": {}, "cold": True}
        assert json.loads(write_study_report(cold, space)["json"].read_text())["warm_start"]["cold"] is True
    finally:
        ray.shutdown()
