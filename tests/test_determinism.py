"""Determinism as a contract (issue 14, guarantee 7), in fresh processes: train.py of one config twice, each with its
own cache folder and MLflow store, gives the same split and cache bytes, the same value of every metric of every
epoch and the same weights (``benchmarks/reliability_determinism.py``; its full run also compares a study run twice
and once interrupted with Ctrl-C and resumed). The in-process checks are in tests/test_training.py."""
from __future__ import annotations

import pytest

from benchmarks.reliability_determinism import compare_values, run, without_timing


def test_compare_values_finds_the_last_bit_and_treats_nan_as_equal():
    a = {"h": [{"val/dice": 0.5, "val/iou": float("nan")}], "w": "abc"}
    assert compare_values(a, {"h": [{"val/dice": 0.5, "val/iou": float("nan")}], "w": "abc"}) == (3, [])
    n, diff = compare_values(a, {"h": [{"val/dice": 0.5 + 2 ** -52, "val/iou": float("nan")}], "w": "abc"})
    assert n == 3 and diff == [".h[0].val/dice: 0.5 vs 0.5000000000000002"]
    assert compare_values([1, 2], [1])[1] == [": 2 vs 1 items"]
    assert without_timing([{"epoch": 1, "epoch_seconds": 3.2, "train/images_per_s": 9.0, "val/dice": 0.1}]) == [
        {"epoch": 1, "val/dice": 0.1}]


@pytest.mark.slow
def test_train_py_twice_in_fresh_processes_gives_identical_bytes_and_metrics():
    result = run(quick=True)
    train = result["train"]
    assert train["runs"] == 2 and train["epochs"] == 2 and train["values_compared"] >= 2 * 15
    assert train["differing"] == []
    assert train["split_identical"] and train["cache_identical"] and train["weights_identical"]
    assert result["nothing_lost"]
