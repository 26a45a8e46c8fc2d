"""tune.py on a real local Ray (2 CPUs) and a real sqlite MLflow store: trials as child runs with final statuses,
ASHA stops, failed trials, champion/challenger in the registry, the mirrored champion and the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from medseg.config import flatten
from medseg.registry import compare
from medseg.search_space import ChampionRule, load_space, space_for_configs
from medseg.tracking import get_client
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()


def _write_base(tmp_path, synth_root, shared_cache, **sections) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(synth_root, shared_cache, tmp_path, **sections)))
    return path


def _space(tmp_path, base: Path, **fields) -> Path:
    doc = {"name": "t", "base_config": base.name, "metric": "val/loss", "mode": "min", "num_samples": 2,
           "max_concurrent": 1, "resources": {"cpu": 1}, "asha": {"max_t": 2, "grace_period": 1, "reduction_factor": 2},
           "max_failures": 0, "storage_path": str(tmp_path / "ray"),
           "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tune-tests",
           "reports_dir": str(tmp_path / "reports"),
           "champion": {"registry_name": "tiny-model", "models_dir": str(tmp_path / "models"),
                        "bootstrap_resamples": 2000, "margin": 0.01}}
    doc.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_study_asha_champion_and_report(ray_local, tmp_path, synth_root, shared_cache, monkeypatch):
    from medseg.study import run_and_promote

    monkeypatch.chdir(tmp_path)
    base = _write_base(tmp_path, synth_root, shared_cache, training={"epochs": 2, "lr": 0.003, "samples_per_epoch": 32})
    # trial 1: the base config (lr 0.003); trial 2: a learning rate too small to learn anything. Run one after the
    # other, trial 2's validation loss after epoch 1 is worse than trial 1's, so ASHA (grace 1) stops it there.
    space = load_space(_space(tmp_path, base, params={"training.lr": {"type": "loguniform", "low": 1e-12,
                                                                       "high": 0.01}},
                              points_to_evaluate=[{"training.lr": 1e-12}]))
    outcome, decision, paths = run_and_promote(space, progress=False)

    by_lr = {t["params"]["training.lr"]: t for t in outcome.trials}
    assert set(by_lr) == {0.003, 1e-12}
    good, stopped = by_lr[0.003], by_lr[1e-12]
    assert good["status"] == "completed" and good["epochs_used"] == 2
    assert stopped["status"] == "stopped_early" and stopped["epochs_used"] == 1
    assert outcome.best["trial_id"] == good["trial_id"]

    client = get_client(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["decision"] == "champion"
    for trial in (good, stopped):
        run = client.get_run(trial["run_id"])
        assert run.info.status == "FINISHED"  # closed by the driver, also when ASHA ended the trial mid-loop
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert run.data.tags["stopped_early"] == ("true" if trial is stopped else "false")
        cfg = space.trial_config(trial["params"])
        cfg.training.monitor, cfg.training.monitor_mode = "val/loss", "min"
        assert run.data.params == {k: str(v) for k, v in flatten(cfg.to_dict()).items()}  # same keys as train.py
        steps = [m.step for m in client.get_metric_history(trial["run_id"], "val/dice")]
        assert steps == list(range(1, trial["epochs_used"] + 1))
    assert {a.path for a in client.list_artifacts(stopped["run_id"], "plots")} == {"plots/learning_curve.png"}

    # champion: registered with the alias, mirrored with its files, decided on the re-evaluated Dice
    assert decision.promoted and decision.alias == "champion" and "no champion yet" in decision.reason
    version = client.get_model_version_by_alias("tiny-model", "champion")
    assert version.run_id == good["run_id"]
    champion = tmp_path / "models" / "champion"
    assert champion.is_symlink()
    assert {p.name for p in champion.iterdir()} == {"checkpoint.pt", "config.yaml", "metrics.json", "MODEL_CARD.md"}
    metrics = json.loads((champion / "metrics.json").read_text())
    assert metrics["candidate"]["dice"] == pytest.approx(decision.candidate["dice"])
    # report: markdown + json + three plots, every trial listed with its status
    report = json.loads(paths["json"].read_text())
    assert report["status_counts"] == {"completed": 1, "stopped_early": 1, "stopped_by_budget": 0, "failed": 0}
    assert report["epochs_used"] == 3 and report["epochs_without_early_stopping"] == 4
    text = paths["markdown"].read_text()
    assert good["trial_id"] in text and stopped["trial_id"] in text and "CHAMPION" in text
    for key in ("parallel", "curves", "budget"):
        assert paths[key].stat().st_size > 1000

    # a second study (fixed configs) retrains the champion's own config: deterministic training gives the same
    # per-case Dice, a gain of 0 is below the margin, so it becomes the challenger and the champion stays
    space2 = space_for_configs([str(base)], name="fixed", template=space)
    _, decision2, paths2 = run_and_promote(space2, progress=False)
    assert decision2.candidate["per_case_dice"] == pytest.approx(decision.candidate["per_case_dice"], nan_ok=True)
    assert not decision2.promoted and decision2.alias == "challenger"
    assert decision2.reason.startswith("kept the champion: gain +0.0000 is below the margin 0.0100")
    assert decision2.bootstrap["prob_better"] == 0.0
    assert decision2.bootstrap["n_cases"] == len(decision.candidate["per_case_dice"])
    assert client.get_model_version_by_alias("tiny-model", "champion").version == version.version
    challenger = client.get_model_version_by_alias("tiny-model", "challenger")
    assert challenger.version != version.version and challenger.run_id != good["run_id"]
    assert os.readlink(champion) == f"versions/tiny-model-v{version.version}"
    assert "CHALLENGER" in paths2["markdown"].read_text()


@pytest.mark.slow  # ~1 min: in make test-slow, so that make test stays near its time budget
def test_failed_trial_is_recorded_and_the_study_goes_on(ray_local, tmp_path, synth_root, shared_cache, monkeypatch):
    from medseg.study import run_and_promote

    monkeypatch.chdir(tmp_path)
    good = _write_base(tmp_path, synth_root, shared_cache, name="good", training={"epochs": 1})
    nan = tmp_path / "nan.yaml"
    nan.write_text(yaml.safe_dump(tiny_config_dict(synth_root, shared_cache, tmp_path, name="nan",
                                                   training={"epochs": 1, "optimizer": "sgd", "lr": 1e12})))
    template = load_space(_space(tmp_path, good,
                                 params={"training.lr": {"type": "uniform", "low": 0.001, "high": 0.01}},
                                 asha={"max_t": 1, "grace_period": 1}))
    space = space_for_configs([str(nan), str(good)], name="faults", template=template)
    outcome, decision, paths = run_and_promote(space, progress=False)
    status = {Path(t["params"]["config_file"]).stem: t for t in outcome.trials}
    assert status["nan"]["status"] == "failed" and "training loss is" in status["nan"]["error"]
    assert status["base"]["status"] == "completed" and decision.promoted
    client = get_client(outcome.tracking_uri)
    failed_run = client.get_run(status["nan"]["run_id"])
    assert failed_run.info.status == "FAILED" and "training loss is" in failed_run.data.tags["error"]
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert "failed: " in paths["markdown"].read_text()


def test_promotion_rule_margin_and_bootstrap():
    rule = ChampionRule(margin=0.01, min_probability=0.95, bootstrap_resamples=5000)
    ids = [f"{i:03d}" for i in range(20)]
    champion = {"dice": 0.6, "per_case_dice": {i: 0.6 + 0.01 * (k % 3) for k, i in enumerate(ids)}}
    better = {"dice": 0.7, "per_case_dice": {i: v + 0.1 for i, v in champion["per_case_dice"].items()}}
    promoted, reason, boot = compare(champion, better, rule)
    assert promoted and boot["prob_better"] == 1.0 and reason.startswith("promoted:")
    tiny_gain = {"dice": 0.605, "per_case_dice": {i: v + 0.005 for i, v in champion["per_case_dice"].items()}}
    promoted, reason, _ = compare(champion, tiny_gain, rule)
    assert not promoted and "below the margin 0.0100" in reason
    # a large mean gain carried by one case is not a reliable improvement
    lucky = {"dice": 0.0, "per_case_dice": dict(champion["per_case_dice"])}
    lucky["per_case_dice"][ids[0]] += 0.9
    for i in ids[1:6]:
        lucky["per_case_dice"][i] -= 0.05
    promoted, reason, boot = compare(champion, lucky, rule)
    assert not promoted and "P(better)" in reason and boot["prob_better"] < 0.95 and boot["delta"] > 0.01
    # several labels: the rule judges the reported Dice (per label over cases, then over labels). Here the
    # challenger's case averages rise (+0.10: half the cases score one label only), but the reported Dice falls
    two = {"dice": 0.55, "labels": [1, 2], "per_case_dice": {i: 0.55 for i in ids},
           "per_case_label_dice": {i: [0.6, 0.5] for i in ids}}
    skewed = {"dice": 0.5, "labels": [1, 2], "per_case_dice": {i: (0.9 if k < 10 else 0.4) for k, i in enumerate(ids)},
              "per_case_label_dice": {i: ([0.9, None] if k < 10 else [0.7, 0.1]) for k, i in enumerate(ids)}}
    promoted, reason, boot = compare(two, skewed, rule)
    assert not promoted and boot["delta"] == pytest.approx((0.8 + 0.1) / 2 - 0.55) and "gain -0.1000" in reason
    promoted, reason, _ = compare({**two, "labels": [1, 3]}, skewed, rule)
    assert not promoted and "different labels" in reason


def test_resume_refuses_a_changed_space_and_names_the_command(tmp_path, synth_root, shared_cache, monkeypatch):
    import shlex

    from medseg.errors import MedsegError
    from medseg.tuning import resume_command, resume_mismatch, run_study

    monkeypatch.chdir(tmp_path)
    base = _write_base(tmp_path, synth_root, shared_cache)
    path = _space(tmp_path, base, params={"training.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})
    sets = ["overrides.training.ema_decay=0.99", "num_samples=3"]
    started = load_space(path, overrides=sets)
    stored = json.loads(json.dumps(started.model_dump()))
    assert resume_mismatch(stored, load_space(path, overrides=sets)) == []
    # the same file without --set: trials would train without the moving average
    diffs = resume_mismatch(stored, load_space(path))
    assert diffs == ["base.training.ema_decay: 0.99 when started, None now",
                     "overrides.training.ema_decay: 0.99 when started, '(absent)' now"]
    assert resume_mismatch(stored, load_space(path, overrides=sets + ["metric=val/iou"])) == [
        "metric: 'val/loss' when started, 'val/iou' now"]
    assert resume_mismatch(stored, load_space(path, overrides=sets + ["max_concurrent=2"])) == []  # scheduling only
    # the printed command repeats the files and every --set, so it resumes the same study
    command = resume_command(started, "s1")
    assert shlex.split(command) == ["python", "tune.py", "--space", str(path), "--set", sets[0], "--set", sets[1],
                                    "--resume", "--name", "s1"]
    exps = space_for_configs([str(base)], name="experiments", template=started)
    assert shlex.split(resume_command(exps, "e1"))[2:6] == ["--space", str(path), "--configs", str(base.resolve())]
    # run_study checks before restoring anything: a resumable folder, then the stored space
    study = tmp_path / "ray" / "s1"
    with pytest.raises(MedsegError, match="holds no resumable study"):
        run_study(load_space(path), resume=True, name="s1")
    from ray import tune

    # the Tune state is not what is tested
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: True))
    study.mkdir(parents=True)
    (study / "medseg_study.json").write_text(json.dumps({"space": stored, "parent_run_id": "x",
                                                         "resume_command": command}))
    with pytest.raises(MedsegError, match=r"--resume: s1: the space differs .*base\.training\.ema_decay: 0\.99 when "
                                          r"started, None now \(and 1 more\); continue it with: "
                                          r"python tune\.py --space .* --set overrides\.training\.ema_decay=0\.99"):
        run_study(load_space(path), resume=True, name="s1")
    # a finished study is not resumed (its promotion would run again): --resume alone picks the latest unfinished one
    from medseg.tuning import latest_study

    space = load_space(path)
    for name, status in (("t-20260101-000000", "interrupted"), ("t-20260102-000000", "finished")):
        (tmp_path / "ray" / name).mkdir(parents=True)
        (tmp_path / "ray" / name / "medseg_study.json").write_text(json.dumps({"space": stored, "status": status,
                                                                               "best_trial": "abc"}))
    assert latest_study(space) == "t-20260101-000000"
    with pytest.raises(MedsegError, match="study t-20260102-000000 already finished"):
        run_study(space, resume=True, name="t-20260102-000000")


# The time-budget test trains far more epochs than any CPU runs in the budget (no trial can complete), and Tune's own
# TimeoutStopper starts counting only once the driver has processed epoch 1 of both running trials (no trial can be
# stopped before it reported an epoch, however slow Ray's startup and the first epoch are). HANG_S only bounds a hang.
BUDGET_EPOCHS, BUDGET_S, HANG_S = 10_000, 10, 600


@pytest.mark.slow  # ~1 min: in make test-slow, so that make test stays near its time budget
def test_time_budget_ends_running_trials_as_stopped_by_budget(ray_local, tmp_path, synth_root, shared_cache,
                                                              monkeypatch):
    """Tune stops the running trials when time_budget_s runs out without calling the callback: the driver closes
    their runs (FINISHED, artifacts logged) and the study still ends with a champion and a report. A third trial,
    created but waiting for a CPU (2 CPUs, 1 per trial), never starts: it is not a trial of the study.

    Independent of the CPU's speed: a trial of 10,000 epochs cannot finish inside the budget, and the budget (Tune's
    real TimeoutStopper, which counts from its first check) is held back until both trials have an epoch reported
    to the driver, so on a slow machine it cannot run out while Ray starts the workers or the first epoch trains."""
    import time

    from ray.tune.stopper import TimeoutStopper

    from medseg.study import run_and_promote
    from medseg.tuning import MlflowTrialCallback

    reported: set[str] = set()  # trials whose epoch report the driver has processed
    gate = {"opened": None, "created": time.monotonic(), "checks_after": 0}
    on_trial_result, stop_all = MlflowTrialCallback.on_trial_result, TimeoutStopper.stop_all

    def on_result_then_note(self, iteration, trials, trial, result, **info):
        on_trial_result(self, iteration, trials, trial, result, **info)
        reported.add(trial.trial_id)
        if len(reported) >= 2 and gate["opened"] is None:
            gate["opened"] = time.monotonic()
        if gate["opened"] is not None and time.monotonic() - gate["opened"] > BUDGET_S + HANG_S:
            raise RuntimeError(f"time_budget_s={BUDGET_S} was not enforced: trials still report {HANG_S} s after it "
                               "ran out")

    def budget_after_first_epochs(self):
        if gate["opened"] is None:  # Tune's stopper has not been asked yet, so its clock has not started
            if time.monotonic() - gate["created"] > HANG_S:
                raise RuntimeError(f"the two trials did not both report an epoch within {HANG_S} s")
            return False
        gate["checks_after"] += 1
        return stop_all(self)

    monkeypatch.setattr(MlflowTrialCallback, "on_trial_result", on_result_then_note)
    monkeypatch.setattr(TimeoutStopper, "stop_all", budget_after_first_epochs)
    monkeypatch.chdir(tmp_path)
    base = _write_base(tmp_path, synth_root, shared_cache, training={"epochs": BUDGET_EPOCHS, "samples_per_epoch": 32})
    space = load_space(_space(tmp_path, base, params={"training.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
                              asha={"enabled": False, "max_t": BUDGET_EPOCHS}, num_samples=3, max_concurrent=3,
                              time_budget_s=BUDGET_S))
    outcome, decision, paths = run_and_promote(space, progress=False)
    assert gate["opened"] is not None and gate["checks_after"] > 0  # the study was ended by Tune's budget
    assert [t["status"] for t in outcome.trials] == ["stopped_by_budget"] * 2
    assert set(reported) == {t["trial_id"] for t in outcome.trials}  # the third trial never reported (never started)
    client = get_client(outcome.tracking_uri)
    for trial in outcome.trials:
        assert 1 <= trial["epochs_used"] < BUDGET_EPOCHS and trial["best_value"] is not None
        run = client.get_run(trial["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["tune_status"] == "stopped_by_budget"
        assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(trial["run_id"], "checkpoint")}
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert decision.promoted  # the registered version's source (runs:/<id>/checkpoint) holds the checkpoint
    report = json.loads(paths["json"].read_text())
    assert report["status_counts"]["stopped_by_budget"] == 2
    # two trials of BUDGET_EPOCHS epochs, not twice the longer one's stop
    assert report["epochs_without_early_stopping"] == 2 * BUDGET_EPOCHS
    state = json.loads((outcome.study_dir / "medseg_study.json").read_text())
    # kept for a resume (Tune's budget spans it): fit() ran at least the budget, which started after the first epochs
    assert state["status"] == "finished" and state["fit_seconds"] >= BUDGET_S
