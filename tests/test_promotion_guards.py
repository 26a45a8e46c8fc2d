"""Promotion guards (champion: {guards: {val/lesion_recall: 0.02}}): a challenger whose guarded metric falls below the
champion's by more than the tolerance is not promoted, whatever its Dice; the reason names the guard."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from medseg.errors import ConfigError
from medseg.registry import GUARD_METRICS, compare, decide_and_register
from medseg.search_space import ChampionRule, load_space
from medseg.tracking import ensure_experiment, get_client, start_run
from medseg.training import fit, prepare_data

ROOT = Path(__file__).resolve().parents[1]
IDS = [f"{i:03d}" for i in range(10)]


def _record(dice: float, lesion_recall: float | None) -> dict:
    return {"dice": dice, "iou": dice / 2, "dice_micro": dice, "lesion_recall": lesion_recall, "lesion_precision": 0.5,
            "per_case_dice": {i: dice for i in IDS}, "labels": [1]}


def _rule(**guards: float) -> ChampionRule:
    return ChampionRule(bootstrap_resamples=200, guards={k.replace("__", "/"): v for k, v in guards.items()})


def test_guard_holds_back_a_challenger_whatever_its_dice():
    champion, better = _record(0.50, 0.80), _record(0.70, 0.70)  # +0.20 Dice on every case, P(better) = 1
    promoted, reason, boot = compare(champion, better, _rule())
    assert promoted and boot["prob_better"] == 1.0
    promoted, reason, _ = compare(champion, better, _rule(val__lesion_recall=0.02))
    assert not promoted
    assert reason.startswith("kept the champion: guard val/lesion_recall held it back: lesion_recall 0.7000 is "
                             "0.1000 below the champion's 0.8000 (tolerance 0.0200). Dice 0.7000 vs champion 0.5000")
    # within the tolerance, or exactly at it, the guard lets it through
    assert compare(champion, _record(0.70, 0.79), _rule(val__lesion_recall=0.02))[0]
    assert compare(champion, _record(0.70, 0.78), _rule(val__lesion_recall=0.02))[0]
    # the bare record key works too; a champion without the metric (no lesion in the split) guards nothing
    assert not compare(champion, better, _rule(lesion_recall=0.05))[0]
    assert compare(_record(0.50, float("nan")), better, _rule(val__lesion_recall=0.0))[0]
    # a candidate without the metric while the champion has it is held back
    promoted, reason, _ = compare(champion, _record(0.70, None), _rule(val__lesion_recall=0.02))
    assert not promoted
    assert "guard val/lesion_recall held it back: the candidate has no lesion_recall (champion 0.8000)" in reason
    # a failing Dice rule and a guard are both reported
    promoted, reason, _ = compare(champion, _record(0.505, 0.5), _rule(val__lesion_recall=0.02))
    assert not promoted and "below the margin" in reason and "guard val/lesion_recall held it back" in reason


def test_a_guard_must_name_a_metric_of_the_record():
    space = load_space(ROOT / "search_spaces" / "smoke.yaml", overrides=["champion.guards={val/lesion_recall: 0.02}"])
    assert space.champion.guards == {"val/lesion_recall": 0.02}
    with pytest.raises(ConfigError) as err:
        load_space(ROOT / "search_spaces" / "smoke.yaml", overrides=["champion.guards={val/recall: 0.02}"])
    message = str(err.value)
    assert "\n" not in message and "smoke.yaml: champion: guard 'val/recall' names no metric" in message
    assert "val/lesion_recall" in message  # the names that would do
    with pytest.raises(ConfigError, match="tolerance must be >= 0"):
        load_space(ROOT / "search_spaces" / "smoke.yaml", overrides=["champion.guards={val/dice: -0.1}"])


def _constant_checkpoint(source: Path, dest: Path, logit: float) -> Path:
    """``source``'s model with its segmentation head answering ``logit`` everywhere: +30 predicts every voxel (lesion
    recall 1), -30 none (lesion recall 0). Metadata (config, split) as ``source``'s."""
    model, meta, _ = model_from_checkpoint(source)
    head = model.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(logit)
    return save_checkpoint(dest, model, load_checkpoint(source)["meta"] | {"epoch": 0})


def _logged_run(client, experiment_id: str, checkpoint: Path, name: str) -> str:
    run_id = start_run(client, experiment_id, run_name=name, params={}, tags={"kind": "train"})
    client.log_artifact(run_id, str(checkpoint), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_guard_decision_on_a_real_store(tiny_cfg, tmp_path):
    from medseg.report import write_study_report
    from medseg.tuning import StudyOutcome

    cfg = tiny_cfg(training={"epochs": 1, "val_overlays": 0})
    trained = fit(cfg, run_dir=tmp_path / "run", progress=False).best_checkpoint
    (tmp_path / "all").mkdir(), (tmp_path / "none").mkdir()
    everything = _constant_checkpoint(trained, tmp_path / "all" / "best.pt", 30.0)
    nothing = _constant_checkpoint(trained, tmp_path / "none" / "best.pt", -30.0)
    uri = cfg.output.tracking_uri
    client = get_client(uri)
    experiment_id = ensure_experiment(uri, "tests")
    data = prepare_data(cfg, progress=False)
    rule = ChampionRule(registry_name="guarded", models_dir=str(tmp_path / "models"), bootstrap_resamples=200,
                        guards={"val/lesion_recall": 0.02})
    first = decide_and_register(checkpoint=everything, run_id=_logged_run(client, experiment_id, everything, "all"),
                                cfg=cfg, rule=rule, uri=uri, data=data, progress=False)
    assert first.promoted and first.candidate["lesion_recall"] == 1.0
    assert set(GUARD_METRICS) <= set(first.candidate)  # every metric a guard may name is in the record

    second = decide_and_register(checkpoint=nothing, run_id=_logged_run(client, experiment_id, nothing, "none"),
                                 cfg=cfg, rule=rule, uri=uri, data=data, progress=False)
    assert not second.promoted and second.alias == "challenger"
    held = ("guard val/lesion_recall held it back: lesion_recall 0.0000 is 1.0000 below the champion's 1.0000 "
            "(tolerance 0.0200)")
    assert held in second.reason and second.rule["guards"] == {"val/lesion_recall": 0.02}
    assert held in client.get_model_version("guarded", second.version).description
    assert str(client.get_model_version_by_alias("guarded", "champion").version) == first.version

    trial = {"trial_id": "t1", "params": {}, "status": "completed", "best_value": 0.0, "best_dice": 0.0,
             "best_iou": 0.0, "best_epoch": 1, "epochs_used": 1, "epochs_planned": 1, "history": [], "error": None,
             "checkpoint": str(nothing)}
    outcome = StudyOutcome(name="guarded", study_dir=tmp_path, parent_run_id="p", experiment_id=experiment_id,
                           tracking_uri=uri, trials=[trial], best=trial)
    space = load_space(ROOT / "search_spaces" / "smoke.yaml")
    paths = write_study_report(outcome, space, second, out_dir=tmp_path / "reports")
    assert held in Path(paths["markdown"]).read_text()
