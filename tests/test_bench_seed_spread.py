"""The summary of benchmarks/bench_seed_spread.py: spread over seeds next to the spread over configurations."""
from __future__ import annotations

import pytest

from benchmarks.bench_seed_spread import summarize
from benchmarks.common import parse_sets


def test_seed_spread_against_config_spread():
    runs = [{"best_dice": v} for v in (0.50, 0.56, 0.42, 0.52)]
    out = summarize(runs, [0.44, 0.50, 0.51, 0.51])
    assert out["seeds"] == 4 and out["configs"] == 4
    assert out["best_dice_range"] == pytest.approx(0.14)
    assert out["best_dice_mean"] == pytest.approx(0.5)
    assert out["best_dice_sd"] == pytest.approx(0.0589, abs=1e-4)
    assert out["config_best_dice_range"] == pytest.approx(0.07)
    assert out["seed_range_over_config_range"] == pytest.approx(2.0)


def test_one_seed_and_no_config_study():
    out = summarize([{"best_dice": 0.5}], None)
    assert out["best_dice_range"] == 0 and out["best_dice_sd"] is None and "configs" not in out


def test_set_values_are_yaml_typed_and_malformed_ones_named():
    assert parse_sets(["training.ema_decay=0.99", "loss.name=tversky", "dataset.context_slices=1"]) == {
        "training.ema_decay": 0.99, "loss.name": "tversky", "dataset.context_slices": 1}
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--set 'training.lr': expected dotted.key=value"):
        parse_sets(["training.lr"])
