"""The loop while the data grows: a champion, then cases are added, then a candidate is judged against the champion
re-evaluated on the validation cases neither trained on. Real twin files, real training, a real sqlite store."""
from __future__ import annotations

from pathlib import Path

import pytest

from medseg.config import config_from_dict
from medseg.data.synthetic import generate_task
from medseg.errors import MedsegError
from medseg.registry import champion_training_cases, decide_and_register
from medseg.search_space import ChampionRule
from medseg.tracking import ensure_experiment, get_client, start_run
from medseg.training import fit, prepare_data
from tests.conftest import tiny_config_dict


def _cfg(data_root: Path, cache: Path, work: Path, **split):
    raw = tiny_config_dict(data_root, cache, work, training={"epochs": 1, "val_overlays": 0, "samples_per_epoch": 16})
    raw["dataset"]["split"] = {"seed": 0, "val_fraction": 0.4, **split}
    return config_from_dict(raw, source="grow")


def _train_and_log(cfg, client, experiment_id: str, run_dir: Path) -> tuple[Path, str]:
    checkpoint = fit(cfg, run_dir=run_dir, progress=False).best_checkpoint
    run_id = start_run(client, experiment_id, run_name=run_dir.name, params={}, tags={"kind": "train"})
    client.log_artifact(run_id, str(checkpoint), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return checkpoint, run_id


@pytest.fixture
def grown(tmp_path):
    """(data root, cache dir): 8 twin cases, grown to 14 by ``grow()``."""
    root = tmp_path / "data"
    generate_task(root, cases=8, size=64, slices=(6, 8), seed=0, methods=("threshold",))

    def grow():
        generate_task(root, cases=14, size=64, slices=(6, 8), seed=0, methods=("threshold",), force=True)

    return root, tmp_path / "cache", grow


def _decide(cfg, checkpoint, run_id, rule, data):
    return decide_and_register(checkpoint=checkpoint, run_id=run_id, cfg=cfg, rule=rule, uri=cfg.output.tracking_uri,
                               data=data, progress=False)


def test_stable_split_growth_rejudges_the_champion_on_the_new_validation_cases(grown, tmp_path):
    root, cache, grow = grown
    cfg = _cfg(root, cache, tmp_path, method="stable")
    client = get_client(cfg.output.tracking_uri)
    experiment_id = ensure_experiment(cfg.output.tracking_uri, "tests")
    rule = ChampionRule(registry_name="grow", models_dir=str(tmp_path / "models"), bootstrap_resamples=200,
                        min_shared_cases=2)
    old = prepare_data(cfg, progress=False)
    champ_ckpt, champ_run = _train_and_log(cfg, client, experiment_id, tmp_path / "r1")
    first = _decide(cfg, champ_ckpt, champ_run, rule, old)
    assert first.promoted and first.comparison is None

    grow()
    new = prepare_data(cfg, progress=False)
    assert new.split.hash != old.split.hash
    for side in ("train", "val"):  # the stable rule: no earlier case changed sides
        assert set(old.split.cases(side)) <= set(new.split.cases(side)), side
    cand_ckpt, cand_run = _train_and_log(cfg, client, experiment_id, tmp_path / "r2")
    decision = _decide(cfg, cand_ckpt, cand_run, rule, new)
    comp = decision.comparison
    assert comp["same_split"] is False and comp["champion_split"] == old.split.hash
    assert comp["left_out"] == [] and comp["n_cases"] == len(new.split.val) > len(old.split.val)
    # the champion was re-evaluated on every new validation case, including the ones added since it was judged
    assert sorted(decision.champion_before["per_case_dice"]) == sorted(new.split.val)
    assert f"re-judged on {len(new.split.val)} shared validation cases" in decision.reason
    assert decision.bootstrap  # a real comparison was made, whatever its outcome
    version = client.get_model_version("grow", decision.version)
    assert version.tags["split_hash"] == new.split.hash and "re-judged" in version.description


def test_a_champion_of_another_split_is_scored_without_the_cases_it_trained_on(grown, tmp_path):
    """A champion of the ordered rule on 8 cases, a candidate of the stable rule on 14: validation cases the champion
    trained on are left out of both scores; with too few left, no comparison and the champion stays."""
    root, cache, grow = grown
    ordered = _cfg(root, cache, tmp_path)
    client = get_client(ordered.output.tracking_uri)
    experiment_id = ensure_experiment(ordered.output.tracking_uri, "tests")
    rule = ChampionRule(registry_name="mixed", models_dir=str(tmp_path / "models"), bootstrap_resamples=200,
                        min_shared_cases=1)
    champ_ckpt, champ_run = _train_and_log(ordered, client, experiment_id, tmp_path / "r1")
    assert _decide(ordered, champ_ckpt, champ_run, rule, prepare_data(ordered, progress=False)).promoted
    trained = set(prepare_data(ordered, progress=False).split.train)

    grow()
    stable = _cfg(root, cache, tmp_path, method="stable", seed=1)
    new = prepare_data(stable, progress=False)
    left_out = sorted(set(new.split.val) & trained)
    shared = sorted(set(new.split.val) - trained)
    assert left_out and shared, "the draw must give both kinds for this test to mean anything"
    cand_ckpt, cand_run = _train_and_log(stable, client, experiment_id, tmp_path / "r2")
    decision = _decide(stable, cand_ckpt, cand_run, rule, new)
    assert sorted(decision.comparison["left_out"]) == left_out and decision.comparison["n_cases"] == len(shared)
    assert sorted(decision.champion_before["per_case_dice"]) == shared
    assert decision.candidate["n_cases"] == len(new.split.val)  # the version's own score: its full validation split
    assert f"{len(left_out)} left out: the champion" in decision.reason

    # the same comparison needing more shared cases than there are: refused, nothing promoted
    strict = rule.model_copy(update={"min_shared_cases": len(shared) + 1})
    before = client.get_model_version_by_alias("mixed", "champion").version
    kept = _decide(stable, cand_ckpt, cand_run, strict, new)
    assert not kept.promoted and kept.bootstrap is None
    assert kept.reason.startswith(f"kept the champion: only {len(shared)} of the candidate's {len(new.split.val)} "
                                  "validation cases were not trained on by the champion")
    assert client.get_model_version_by_alias("mixed", "champion").version == before  # the refusal changed nothing
    assert str(client.get_model_version_by_alias("mixed", "challenger").version) == kept.version


def test_training_cases_of_an_older_checkpoint_come_from_its_saved_split(grown, tmp_path):
    root, cache, grow = grown
    cfg = _cfg(root, cache, tmp_path)
    data = prepare_data(cfg, progress=False)
    meta = {"split_hash": data.split.hash}  # a checkpoint written before split_train existed
    assert champion_training_cases(meta, data) == set(data.split.train)
    grow()  # the data's new version has its own cache folder: the old split is still found
    grown_data = prepare_data(cfg, progress=False)
    assert grown_data.split.path.parent.parent != data.split.path.parent.parent
    assert champion_training_cases(meta, grown_data) == set(data.split.train)
    assert champion_training_cases({"split_hash": "unknown"}, data) is None
    assert champion_training_cases({"split_train": ["a", "b"]}, data) == {"a", "b"}


def test_a_registry_of_another_label_set_is_refused_in_one_line(grown, tmp_path):
    root, cache, _ = grown
    cfg = _cfg(root, cache, tmp_path)
    client = get_client(cfg.output.tracking_uri)
    experiment_id = ensure_experiment(cfg.output.tracking_uri, "tests")
    rule = ChampionRule(registry_name="task", models_dir=str(tmp_path / "models"), bootstrap_resamples=200)
    data = prepare_data(cfg, progress=False)
    ckpt, run = _train_and_log(cfg, client, experiment_id, tmp_path / "r1")
    assert _decide(cfg, ckpt, run, rule, data).promoted
    other = data.__class__(**{**data.__dict__, "labels": [1, 2]})
    with pytest.raises(MedsegError) as err:
        _decide(cfg, ckpt, run, rule, other)
    message = str(err.value)
    assert "champion.registry_name 'task'" in message and "another task" in message and "\n" not in message
    assert len(client.search_model_versions("name='task'")) == 1  # nothing registered
