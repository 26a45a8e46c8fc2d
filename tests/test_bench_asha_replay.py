"""The ASHA replay of benchmarks/bench_asha.py follows Ray's stopping rule, checked on hand-made curves and against
Ray's own ``_Bracket`` for the same arrival order."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_asha import asha_replay, early_rank_agreement


def test_clear_winner_is_always_kept_and_losers_stop_at_the_first_rung():
    # the winner leads from epoch 1; two losers are flat and low, so whoever comes after the winner stops at rung 1
    curves = [[0.5, 0.6, 0.7, 0.8], [0.1, 0.1, 0.1, 0.1], [0.05, 0.05, 0.05, 0.05]]
    out = asha_replay(curves, max_t=4, grace=1, rf=2, orders=200)
    assert out["rungs"] == [1, 2, 4]
    assert out["p_keeps_best"] == 1.0 and out["mean_dice_ratio"] == 1.0
    assert out["mean_epoch_ratio"] < 1.0


def test_a_late_bloomer_is_lost_at_an_early_rung_but_kept_after_its_transient():
    late = [0.01, 0.02, 0.9, 0.95]
    steady = [0.3, 0.4, 0.5, 0.6]
    early = asha_replay([late, steady], max_t=4, grace=1, rf=2, orders=200)
    # the late bloomer survives only when it arrives first (an empty rung has no cutoff): about half the orders
    assert 0.3 < early["p_keeps_best"] < 0.7
    after = asha_replay([late, steady], max_t=4, grace=3, rf=2, orders=200)
    assert after["p_keeps_best"] == 1.0


@pytest.mark.parametrize("grace,rf", [(1, 2), (1, 3), (2, 2), (1, 2.0)])
def test_matches_rays_bracket_for_one_order(grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    rng = np.random.default_rng(1)
    curves = rng.uniform(0, 1, size=(6, 6)).cumsum(axis=1).tolist()
    bracket = _Bracket(grace, 6, rf, 0)

    class T:  # _Bracket only reads trial_id
        def __init__(self, i):
            self.trial_id = str(i)

    ray_epochs = 0
    for i, curve in enumerate(curves):
        running = np.maximum.accumulate(curve)
        for epoch in range(1, 7):
            ray_epochs += 1
            if bracket.on_result(T(i), epoch, float(running[epoch - 1])) == TrialScheduler.STOP:
                break
    out = asha_replay(curves, max_t=6, grace=grace, rf=rf, order_list=[list(range(len(curves)))])
    assert out["orders"] == 1
    assert out["mean_epoch_ratio"] == pytest.approx(round(ray_epochs / 36, 3))


def test_early_rank_agreement_sees_a_late_bloomer_and_a_drop():
    curves = [[0.01, 0.02, 0.9, 0.95], [0.3, 0.4, 0.5, 0.6], [0.2, 0.5, 0.1, 0.55]]
    out = early_rank_agreement(curves)
    assert [r["epoch"] for r in out] == [1, 2, 3, 4]
    assert [r["winner_rank"] for r in out] == [3, 3, 1, 1]  # the late bloomer is last until epoch 3
    assert out[0]["spearman_with_final"] == pytest.approx(-0.5)  # running best at epoch 1: 0.01 < 0.2 < 0.3
    assert out[-1]["spearman_with_final"] == pytest.approx(1.0)
    assert out[0]["largest_drop_from_here"] == pytest.approx(0.4)  # 0.5 -> 0.1 between epochs 2 and 3
    assert out[2]["largest_drop_from_here"] == 0.0 and out[3]["largest_drop_from_here"] == 0.0


def test_reanalyse_recomputes_the_curve_analysis_from_a_results_file(tmp_path):
    import json

    from benchmarks.bench_asha import reanalyse

    curves = [[0.1, 0.3, 0.5, 0.52, 0.55, 0.56], [0.3, 0.35, 0.4, 0.42, 0.43, 0.44], [0.05, 0.2, 0.45, 0.5, 0.6, 0.61]]
    path = tmp_path / "asha.json"
    trials = [{"status": "completed", "val_dice": c} for c in curves]
    path.write_text(json.dumps({"space": "search_spaces/default.yaml", "sets": ["overrides.training.ema_decay=0.99"],
                                "summary": {"epoch_ratio": 0.5},
                                "studies": {"no_early_stopping": {"trials": trials}}}))
    summary = json.loads(json.dumps(reanalyse(path)["summary"]))
    assert summary == json.loads(path.read_text())["summary"] and summary["epoch_ratio"] == 0.5
    assert [r["winner_rank"] for r in summary["early_rank_agreement"]] == [3, 3, 2, 2, 1, 1]
    default = next(r for r in summary["replay"] if (r["grace_period"], r["reduction_factor"]) == (1, 3))
    assert default == asha_replay(curves, max_t=6, grace=1, rf=3)


def test_one_given_order_reports_where_each_trial_stopped_and_whether_the_target_is_met():
    # rungs 1 and 2 (grace 1, rf 2, max_t 4): trial 0 passes every empty rung, trial 1 is below it at rung 1,
    # trial 2 is above the median of [0.5, 0.1] at rung 1 and below the (only) value 0.6 at rung 2
    curves = [[0.5, 0.6, 0.7, 0.8], [0.1, 0.1, 0.1, 0.1], [0.4, 0.45, 0.9, 0.95]]
    out = asha_replay(curves, max_t=4, grace=1, rf=2, order_list=[[0, 1, 2]])
    assert out["stopped_at"] == [4, 1, 2]
    assert out["mean_epoch_ratio"] == pytest.approx(round(7 / 12, 3))
    assert out["mean_dice_ratio"] == pytest.approx(round(0.8 / 0.95, 3))
    assert out["p_meets_target"] == 0.0  # 0.58 of the epochs, 0.84 of the Dice
    lenient = asha_replay(curves, max_t=4, grace=1, rf=2, order_list=[[0, 1, 2]], epoch_target=0.6, dice_target=0.8)
    assert lenient["p_meets_target"] == 1.0
    assert "stopped_at" not in asha_replay(curves, max_t=4, grace=1, rf=2, orders=20)


def _bracket_epochs(curves, order, grace, rf, max_t):
    """Epochs each trial trains under Ray's own _Bracket when trials arrive one after another in ``order``."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    bracket = _Bracket(grace, max_t, rf, 0)

    class T:
        def __init__(self, i):
            self.trial_id = str(i)

    used = [0] * len(curves)
    for i in order:
        running = np.maximum.accumulate(curves[i])
        for epoch in range(1, max_t + 1):
            used[i] = epoch
            if bracket.on_result(T(i), epoch, float(running[epoch - 1])) == TrialScheduler.STOP:
                break
    return used


def test_replay_check_finds_the_start_order_of_trials_that_started_together():
    from benchmarks.bench_asha import replay_check

    rng = np.random.default_rng(3)
    curves = rng.uniform(0, 1, size=(6, 6)).cumsum(axis=1).tolist()
    params = [{"loss.name": f"l{i}"} for i in range(6)]

    def studies(measured):
        return {"asha": {"trials": [{"params": p, "epochs_used": e} for p, e in zip(params, measured)]},
                "no_early_stopping": {"trials": [{"params": p, "status": "completed", "val_dice": c}
                                                 for p, c in zip(params, curves)]}}

    in_order = _bracket_epochs(curves, [0, 1, 2, 3, 4, 5], 1, 2, 6)
    swapped = _bracket_epochs(curves, [1, 0, 2, 3, 4, 5], 1, 2, 6)
    assert in_order != swapped  # the race of the first two trials matters for these curves
    check = replay_check(studies(in_order), max_t=6, grace=1, rf=2, together=2)
    assert check["matching_order"] == [0, 1, 2, 3, 4, 5] and check["measured_epochs_per_trial"] == in_order
    check = replay_check(studies(swapped), max_t=6, grace=1, rf=2, together=2)
    assert check["matching_order"] == [1, 0, 2, 3, 4, 5] and check["replayed_epochs_per_trial"] == in_order
    assert replay_check(studies(swapped), max_t=6, grace=1, rf=2, together=1)["matching_order"] is None
    other = studies(in_order)
    other["asha"]["trials"][0]["params"] = {"loss.name": "other"}  # the studies drew different configurations
    assert replay_check(other, max_t=6, grace=1, rf=2, together=2) is None
