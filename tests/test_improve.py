"""tune.py --improve (medseg/improve.py): the change key without Ray, then the loop on a real local Ray and sqlite
store."""
from __future__ import annotations

import json
import time

import pytest
from filelock import FileLock

from medseg import improve as imp
from medseg.search_space import load_space
from medseg.tracking import get_client
from tests.test_tuning import _space, _write_base, ray_local  # noqa: F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------- key, no Ray


def _load(tmp_path, synth_root, shared_cache, overrides=None, **fields):
    base = _write_base(tmp_path, synth_root, shared_cache, training={"epochs": 1, "samples_per_epoch": 16})
    return load_space(_space(tmp_path, base, asha={"max_t": 1, "grace_period": 1},
                             params={"training.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}, **fields),
                      overrides=overrides)


def test_change_key_and_record(tmp_path, synth_root, shared_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = _load(tmp_path, synth_root, shared_cache)
    key = imp.change_key(space, "fp1", commit="abc")
    assert imp.change_key(space, "fp1", commit="abc") == key
    # volatile: the budget, --set values that only restate it, the file's description
    budgeted = imp.with_budget(space, 60)
    assert budgeted.time_budget_s == 60 and budgeted.cli_overrides == ["time_budget_s=60"]
    assert space.time_budget_s is None
    assert imp.change_key(budgeted, "fp1", commit="abc") == key
    described = _load(tmp_path, synth_root, shared_cache, overrides=["description=other"])
    assert imp.change_key(described, "fp1", commit="abc") == key
    # what a study trains on, searches or is judged by
    more_samples = _load(tmp_path, synth_root, shared_cache, num_samples=3)
    assert imp.change_key(more_samples, "fp1", commit="abc").space != key.space
    assert imp.change_key(_load(tmp_path, synth_root, shared_cache, overrides=["overrides.training.lr=0.002"]), "fp1",
                          commit="abc").space != key.space
    assert imp.change_key(space, "fp2", commit="abc").diff(key) == ["data fingerprint changed (fp1 -> fp2)"]
    assert imp.change_key(space, "fp1", commit="def").diff(key) == ["code commit changed (abc -> def)"]
    assert key.diff(None) == ["no earlier improve run of this space"]
    # budget default: the space's own, else 1800; --budget-s wins
    assert imp.with_budget(space, None).time_budget_s == imp.DEFAULT_BUDGET_S
    assert imp.with_budget(space.model_copy(update={"time_budget_s": 300.0}), None).time_budget_s == 300

    state, lock = imp.paths(space)
    assert state.name == "improve-t.json" and lock.name == "improve-t.lock" and state.parent == tmp_path / "ray"
    assert imp.last_record(state) is None and not imp.unchanged(key, None)
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    assert imp.last_record(state) is None  # a broken file: run again rather than crash
    state.write_text(json.dumps({"key": {"data": "fp1", "space": key.space, "code": "abc"}, "study": "t-1"}))
    assert imp.unchanged(key, imp.last_record(state))
    assert not imp.unchanged(imp.change_key(space, "fp1", commit="def"), imp.last_record(state))


def test_lock_held_exits_promptly(tmp_path, synth_root, shared_cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = _load(tmp_path, synth_root, shared_cache)
    _, lock_path = imp.paths(space)
    lock_path.parent.mkdir(parents=True)
    monkeypatch.setattr(imp, "_improve_locked", lambda *a, **k: pytest.fail("ran without the lock"))
    with FileLock(str(lock_path)):
        started = time.monotonic()
        code = imp.improve(space, lock_timeout=0.5)
        assert time.monotonic() - started < 5
    assert code == imp.EXIT_LOCKED
    out = capsys.readouterr().out.strip()
    assert out == f"improve: another improve run of space 't' holds {lock_path}; not started (exit 75)"


def test_audit_errors_stop_with_exit_1(tmp_path, shared_cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = _load(tmp_path, tmp_path / "no-such-data", shared_cache)
    assert imp.improve(space) == imp.EXIT_AUDIT
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("improve: data audit found 1 hard error(s), no study run; first: [dataset]")
    assert "python -m medseg.data check --config" in out[0]
    assert not imp.paths(space)[0].exists()


# ------------------------------------------------------------------------------------ the loop, real Ray


@pytest.mark.slow  # ~1 min: in make test-slow, so that make test stays near its time budget
def test_improve_skips_unchanged_reruns_on_new_data_and_force(ray_local, tmp_path, shared_cache, monkeypatch, capsys):  # noqa: F811
    from medseg.data.synthetic import generate_task

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    generate_task(data, cases=8, size=64, slices=(6, 8), seed=0)
    space = _load(tmp_path, data, shared_cache)
    client = get_client(space.tracking_uri)
    state, _ = imp.paths(space)

    def studies():
        exp = client.get_experiment_by_name(space.experiment)
        return client.search_runs([exp.experiment_id], "tags.kind = 'study'") if exp else []

    def improve_lines():
        return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("improve: ")]

    timings = {}
    started = time.monotonic()
    assert imp.improve(space, budget_s=600, progress=False) == 0
    timings["first"] = time.monotonic() - started
    lines = improve_lines()
    assert lines[0] == "improve: running a study of space 't' (budget 600 s): no earlier improve run of this space"
    first = json.loads(state.read_text())
    assert len(studies()) == 1 and first["decision"] == "champion"
    run = client.get_run(first["study_run_id"])
    assert json.loads(run.data.tags["improve_key"]) == first["key"] and run.info.status == "FINISHED"

    # (a) nothing changed: no new study, one line that says why
    started = time.monotonic()
    assert imp.improve(space, progress=False) == 0
    timings["unchanged"] = time.monotonic() - started
    lines = improve_lines()
    assert len(lines) == 1 and lines[0].startswith("improve: nothing changed since the last decision of space 't' "
                                                   f"(study {first['study']}, champion, ")
    assert lines[0].endswith("same data fingerprint, search space and code commit; --force runs anyway")
    assert len(studies()) == 1 and json.loads(state.read_text()) == first

    # (b) the data changed (regenerated with another seed into the same folder): runs again
    generate_task(data, cases=8, size=64, slices=(6, 8), seed=1, force=True)
    started = time.monotonic()
    assert imp.improve(space, progress=False) == 0
    timings["new data"] = time.monotonic() - started
    lines = improve_lines()
    assert lines[0].startswith(f"improve: running a study of space 't' (budget {imp.DEFAULT_BUDGET_S:g} s): "
                               f"data fingerprint changed ({first['key']['data']} -> ")
    second = json.loads(state.read_text())
    assert len(studies()) == 2 and second["key"]["data"] != first["key"]["data"] and second["study"] != first["study"]

    # (c) --force: runs although nothing changed
    started = time.monotonic()
    assert imp.improve(space, force=True, progress=False) == 0
    timings["force"] = time.monotonic() - started
    assert improve_lines()[0] == f"improve: running a study of space 't' (budget {imp.DEFAULT_BUDGET_S:g} s): --force"
    assert len(studies()) == 3 and json.loads(state.read_text())["key"] == second["key"]
    print("timings", {k: round(v, 1) for k, v in timings.items()})
