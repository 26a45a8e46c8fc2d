"""Hand-computed tests of medseg.metrics, including empty masks, plus one check against the real evalseg scores."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medseg import metrics
from medseg.metrics import (
    Counts,
    LesionCounts,
    case_metrics,
    case_metrics_from_counts,
    confusion_counts,
    dice,
    iou,
    lesion_detection,
    lesion_precision,
    lesion_recall,
    mean_per_case_dice,
    paired_bootstrap,
    precision,
    sensitivity,
    summarize,
)

EVALSEG_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "evalseg"


def approx(value: float):
    return pytest.approx(value, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------------------- counts


def test_dice_iou_of_the_smp_example():
    counts = confusion_counts(np.array([1, 1, 1, 1]), np.array([1, 1, 0, 0]), [1])
    assert counts == {1: Counts(tp=2, fp=2, fn=0, tn=0)}
    c = counts[1]
    assert dice(c) == approx(2 / 3)
    assert iou(c) == approx(1 / 2)
    assert sensitivity(c) == approx(1.0)
    assert precision(c) == approx(1 / 2)
    # Swapping prediction and truth swaps fp/fn: sensitivity and precision trade places, Dice does not move.
    swapped = confusion_counts(np.array([1, 1, 0, 0]), np.array([1, 1, 1, 1]), [1])[1]
    assert swapped == Counts(tp=2, fp=0, fn=2, tn=0)
    assert (sensitivity(swapped), precision(swapped), dice(swapped)) == (approx(0.5), approx(1.0), approx(2 / 3))


def test_both_empty_is_nan_not_zero_or_one():
    c = confusion_counts(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 4), np.uint8), [1])[1]
    assert c == Counts(tp=0, fp=0, fn=0, tn=24)
    assert all(math.isnan(f(c)) for f in (dice, iou, sensitivity, precision))


def test_empty_truth_with_prediction_scores_zero():
    c = confusion_counts(np.array([0, 1, 1, 0]), np.array([0, 0, 0, 0]), [1])[1]
    assert c == Counts(tp=0, fp=2, fn=0, tn=2)
    assert dice(c) == 0.0 and iou(c) == 0.0 and precision(c) == 0.0
    assert math.isnan(sensitivity(c))  # no true voxels: recall undefined


def test_multi_label_counts_value_by_value():
    pred = np.array([0, 1, 1, 2, 2, 3, 0], np.uint8)
    target = np.array([0, 1, 2, 2, 3, 3, 1], np.uint8)
    counts = confusion_counts(pred, target, [0, 1, 2, 3, 5])
    assert counts == {
        0: Counts(tp=1, fp=1, fn=0, tn=5),  # background as a label: hit at 0, predicted 0 at 6 (truth 1)
        1: Counts(tp=1, fp=1, fn=1, tn=4),  # hit at 1, predicted at 2 (truth 2), missed at 6
        2: Counts(tp=1, fp=1, fn=1, tn=4),  # hit at 3, predicted at 4 (truth 3), missed at 2
        3: Counts(tp=1, fp=0, fn=1, tn=5),  # hit at 5, missed at 4
        5: Counts(tp=0, fp=0, fn=0, tn=7),  # a label value absent from both volumes
    }
    # An unlisted value (3) is "rest"; the order of labels is kept.
    subset = confusion_counts(pred, target, [2, 1])
    assert list(subset) == [2, 1] and subset[1] == counts[1] and subset[2] == counts[2]


@pytest.mark.parametrize("mapping", [(0, 1, 2, 3), (0, 300, 7, 40000), (0, 70000, 5, 2**40)])
def test_large_label_values_match_small_ones(mapping, monkeypatch):
    # Values > 255 go through a lookup table, values >= 2**16 through a binary search; both must agree with the
    # direct path. Small chunks (not dividing the volume) exercise the accumulation over chunks.
    monkeypatch.setattr(metrics, "_CHUNK_VOXELS", 37)
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 4, size=(6, 5, 7)).astype(np.uint8)
    target = rng.integers(0, 4, size=(6, 5, 7)).astype(np.uint8)
    lut = np.array(mapping, dtype=np.int64)
    direct = confusion_counts(pred, target, [1, 2, 3])
    mapped = confusion_counts(lut[pred], lut[target], [int(v) for v in mapping[1:]])
    assert list(mapped.values()) == list(direct.values())
    for label in (1, 2, 3):  # and against the definition, one comparison per label
        p, t = pred == label, target == label
        assert direct[label] == Counts(int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()),
                                       int((~p & ~t).sum()))


def test_counts_of_views_bool_and_slices():
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 3, size=(4, 6, 5)).astype(np.uint8)
    target = rng.integers(0, 3, size=(4, 6, 5)).astype(np.uint8)
    whole = confusion_counts(pred, target, [1, 2])
    # Non-contiguous views count the same voxels.
    assert confusion_counts(pred.transpose(2, 0, 1), target.transpose(2, 0, 1), [1, 2]) == whole
    assert confusion_counts(np.asfortranarray(pred), np.asfortranarray(target), [1, 2]) == whole
    # Summing slice counts gives the whole-volume counts (how validation accumulates a case).
    summed = {label: sum((confusion_counts(pred[..., z], target[..., z], [label])[label] for z in range(5)),
                         Counts(0, 0, 0, 0)) for label in (1, 2)}
    assert summed == whole
    assert all(isinstance(v, int) for c in whole.values() for v in c.as_dict().values())
    boolean = confusion_counts(pred == 1, target == 1, [1])
    assert boolean == {1: whole[1]}


def test_confusion_counts_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_counts(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), [1])
    with pytest.raises(ValueError, match="integer"):
        confusion_counts(np.zeros(3, np.float32), np.zeros(3, np.uint8), [1])
    with pytest.raises(ValueError, match="non-negative"):
        confusion_counts(np.array([0, -1]), np.array([0, 1]), [1])
    with pytest.raises(ValueError, match="duplicates"):
        confusion_counts(np.zeros(3, np.uint8), np.zeros(3, np.uint8), [1, 1])
    with pytest.raises(ValueError, match="empty"):
        confusion_counts(np.zeros(3, np.uint8), np.zeros(3, np.uint8), [])


# ----------------------------------------------------------------------------------------------- per case


def test_case_metrics_keys_and_nanmean_over_labels():
    pred = np.array([1, 1, 1, 1, 0, 0], np.uint8)
    target = np.array([1, 1, 0, 0, 0, 0], np.uint8)
    row = case_metrics(pred, target, [1, 2])
    assert row["dice/1"] == approx(2 / 3) and row["iou/1"] == approx(0.5)
    assert (row["tp/1"], row["fp/1"], row["fn/1"], row["tn/1"]) == (2, 2, 0, 2)
    assert math.isnan(row["dice/2"])  # label 2 empty in both
    assert row["dice"] == approx(2 / 3) and row["iou"] == approx(0.5)  # NaN label left out of the mean
    assert row["precision"] == approx(0.5)
    assert not any(key.startswith("lesion") for key in row)
    empty = case_metrics(np.zeros(4, np.uint8), np.zeros(4, np.uint8), [1, 2])
    assert math.isnan(empty["dice"]) and math.isnan(empty["iou"])
    with pytest.raises(ValueError, match="lesion label 3"):
        case_metrics(pred, target, [1, 2], lesion_labels=[3])


# ----------------------------------------------------------------------------------------------- summaries


def _case(pred: list[int], target: list[int], labels=(1,), **kwargs) -> dict:
    return case_metrics(np.array(pred, np.uint8), np.array(target, np.uint8), list(labels), **kwargs)


def test_summarize_leaves_out_empty_empty_and_scores_false_positive_cases_zero():
    cases = [
        _case([1, 1, 1, 1], [1, 1, 0, 0]),  # Dice 2/3, IoU 1/2
        _case([0, 0, 0, 0], [0, 0, 0, 0]),  # both empty: left out, counted in n_empty_empty
        _case([0, 1, 0, 0], [0, 0, 0, 0]),  # empty truth, a prediction: 0, counted
    ]
    summary = summarize(cases)
    assert summary["dice"] == approx((2 / 3 + 0) / 2)
    assert summary["iou"] == approx((1 / 2 + 0) / 2)
    assert (summary["n_cases"], summary["n_scored"], summary["n_empty_empty"]) == (3, 2, 1)
    # micro: tp=2, fp=3, fn=0 over the three cases
    assert summary["dice_micro"] == approx(4 / 7) and summary["iou_micro"] == approx(2 / 5)
    assert summary["sensitivity"] == approx(1.0) and summary["precision"] == approx(2 / 5)
    assert "dice/1" not in summary and "lesion_recall" not in summary  # one label: no per-label keys
    assert all(type(v) in (int, float) for v in summary.values())
    # Only the counts are read: a JSON round trip (NaN included) and extra keys give the same summary.
    reloaded = [dict(json.loads(json.dumps(row)), case_id=str(i)) for i, row in enumerate(cases)]
    assert json.dumps(summarize(reloaded)) == json.dumps(summary)


def test_micro_and_macro_differ():
    big_hit = [1] * 8 + [0] * 12  # truth 8 voxels, predicted exactly
    miss_truth = [0] * 8 + [1, 1] + [0] * 10  # truth 2 voxels ...
    miss_pred = [0] * 10 + [1, 1, 1] + [0] * 7  # ... predicted 3 voxels elsewhere
    summary = summarize([_case(big_hit, big_hit), _case(miss_pred, miss_truth)])
    assert summary["dice"] == approx((1 + 0) / 2) and summary["iou"] == approx(0.5)  # macro over cases
    # micro: tp=8, fp=3, fn=2
    assert summary["dice_micro"] == approx(16 / 21)
    assert summary["iou_micro"] == approx(8 / 13)
    assert summary["sensitivity"] == approx(8 / 10)
    assert summary["precision"] == approx(8 / 11)


def test_summarize_several_labels_reports_per_label_and_mean_over_labels():
    cases = [
        _case([1, 1, 0, 0], [1, 1, 0, 0], labels=(1, 2)),  # label 1 Dice 1; label 2 empty-empty
        _case([0, 2, 1, 0], [1, 2, 0, 0], labels=(1, 2)),  # label 1 Dice 0; label 2 Dice 1
        _case([2, 1, 0, 0], [1, 2, 0, 0], labels=(1, 2)),  # label 1 Dice 0; label 2 Dice 0
    ]
    summary = summarize(cases)
    assert summary["dice/1"] == approx(1 / 3) and summary["dice/2"] == approx(1 / 2)
    assert summary["dice"] == approx(5 / 12)  # mean over labels; the mean of case-level Dice would be 1/2
    assert (summary["n_scored/1"], summary["n_empty_empty/1"]) == (3, 0)
    assert (summary["n_scored/2"], summary["n_empty_empty/2"]) == (2, 1)
    assert (summary["n_cases"], summary["n_scored"], summary["n_empty_empty"]) == (3, 3, 0)
    # label 1 pooled: tp=2, fp=2, fn=2; label 2 pooled: tp=1, fp=1, fn=1
    assert summary["dice_micro/1"] == approx(0.5) and summary["dice_micro/2"] == approx(0.5)
    assert summary["iou_micro/1"] == approx(1 / 3) and summary["iou_micro"] == approx(1 / 3)


def test_summarize_rejects_inconsistent_cases():
    with pytest.raises(ValueError, match="at least one case"):
        summarize([])
    with pytest.raises(ValueError, match="case 1 has labels"):
        summarize([_case([1], [1]), _case([1], [1], labels=(1, 2))])


def test_mean_per_case_dice():
    assert mean_per_case_dice([0.5, float("nan"), None, 1.0]) == (approx(0.75), 2)
    mean, n_scored = mean_per_case_dice([float("nan"), None])
    assert math.isnan(mean) and n_scored == 0


# ----------------------------------------------------------------------------------------------- lesions


def _two_lesions_one_hit_one_fp() -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((12, 12, 12), bool)
    pred = np.zeros_like(target)
    target[1:3, 1:3, 1:3] = True  # lesion A, 8 voxels
    pred[1:3, 1:3, 1] = True  # covers 4 of A's 8 voxels (50%)
    target[8:10, 1:3, 1:3] = True  # lesion B, missed
    pred[8:10, 8:10, 8:10] = True  # false-positive blob, no truth under it
    return pred, target


def test_lesion_detection_hit_miss_false_positive():
    pred, target = _two_lesions_one_hit_one_fp()
    counts = lesion_detection(pred, target)
    assert counts == LesionCounts(n_true=2, n_true_detected=1, n_pred=2, n_pred_correct=1)
    assert lesion_recall(counts) == 0.5 and lesion_precision(counts) == 0.5
    assert lesion_detection(pred.astype(np.uint8), target.astype(np.uint8)) == counts  # nonzero = foreground


def test_foreground_box_is_the_tight_box_of_the_foreground():
    mask = np.zeros((6, 5, 7), bool)
    mask[1, 2, 3] = mask[4, 2, 5] = True
    assert metrics.foreground_box(mask) == (slice(1, 5), slice(2, 3), slice(3, 6))
    assert np.array_equal(mask[metrics.foreground_box(mask)].nonzero()[0], [0, 3])
    assert metrics.foreground_box(np.zeros((3, 3), bool)) is None


def test_diagonal_neighbours_form_one_component():
    target = np.zeros((4, 4, 4), bool)
    target[0, 0, 0] = target[1, 1, 1] = True  # touch only by a corner: 26-connected, not 6- or 18-connected
    pred = np.zeros_like(target)
    pred[0, 0, 0] = True  # half of the one lesion
    assert lesion_detection(pred, target) == LesionCounts(n_true=1, n_true_detected=1, n_pred=1, n_pred_correct=1)
    target[3, 3, 3] = True  # not touching (1, 1, 1): a second lesion
    assert lesion_detection(pred, target).n_true == 2


def test_min_overlap_boundary_is_inclusive():
    def with_coverage(box: tuple[int, int, int], n_covered: int, min_overlap: float) -> LesionCounts:
        target = np.zeros((8, 8, 8), bool)
        lesion = tuple(slice(1, 1 + side) for side in box)
        target[lesion] = True
        pred = np.zeros_like(target)
        covered = np.zeros(int(np.prod(box)), bool)
        covered[:n_covered] = True  # a C-order prefix of the box: one connected piece inside the lesion
        pred[lesion] = covered.reshape(box)
        return lesion_detection(pred, target, min_overlap=min_overlap)

    assert with_coverage((2, 3, 5), 3, 0.1).n_true_detected == 1  # 3 of 30 voxels: exactly 10% counts
    assert with_coverage((2, 3, 5), 2, 0.1).n_true_detected == 0
    assert with_coverage((2, 3, 5), 15, 0.5).n_true_detected == 1
    assert with_coverage((2, 3, 5), 14, 0.5).n_true_detected == 0
    # 7 / 25 is exactly 0.28, but 0.28 * 25 == 7.000000000000001 in floating point: a product test would miss it.
    assert with_coverage((1, 5, 5), 7, 0.28).n_true_detected == 1
    assert with_coverage((1, 5, 5), 6, 0.28).n_true_detected == 0

    # The predicted side: a 30-voxel predicted blob with 3 (then 2) voxels of truth inside.
    pred = np.zeros((6, 6, 8), bool)
    pred[1:3, 1:4, 1:6] = True
    for n_true_voxels, correct in ((3, 1), (2, 0)):
        target = np.zeros_like(pred)
        target[1, 1, 1 : 1 + n_true_voxels] = True
        counts = lesion_detection(pred, target, min_overlap=0.1)
        assert counts == LesionCounts(n_true=1, n_true_detected=1, n_pred=1, n_pred_correct=correct)


def test_lesion_detection_empty_and_errors():
    empty = lesion_detection(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool))
    assert empty == LesionCounts(0, 0, 0, 0)
    assert math.isnan(lesion_recall(empty)) and math.isnan(lesion_precision(empty))
    only_pred = np.zeros((3, 3, 3), bool)
    only_pred[1, 1, 1] = True
    counts = lesion_detection(only_pred, np.zeros_like(only_pred))
    assert counts == LesionCounts(0, 0, 1, 0) and lesion_precision(counts) == 0.0
    with pytest.raises(ValueError, match="min_overlap"):
        lesion_detection(only_pred, only_pred, min_overlap=0.0)
    with pytest.raises(ValueError, match=r"\(3, 3, 3\).*\(3, 3\)"):
        lesion_detection(only_pred, np.zeros((3, 3), bool))


def test_lesion_counts_are_pooled_over_cases_not_averaged():
    pred, target = _two_lesions_one_hit_one_fp()  # recall 1/2, precision 1/2
    hit = np.zeros((5, 5, 5), np.uint8)
    hit[1:3, 1:3, 1:3] = 1  # recall 1, precision 1
    cases = [case_metrics(pred.astype(np.uint8), target.astype(np.uint8), [1], lesion_labels=[1]),
             case_metrics(hit, hit, [1], lesion_labels=[1])]
    assert (cases[0]["lesion_n_true/1"], cases[0]["lesion_n_pred_correct/1"]) == (2, 1)
    assert cases[0]["lesion_recall/1"] == 0.5
    summary = summarize(cases)
    assert summary["lesion_recall"] == approx(2 / 3)  # (1 + 1) / (2 + 1); averaging cases would give 3/4
    assert summary["lesion_precision"] == approx(2 / 3)
    assert (summary["lesion_n_true"], summary["lesion_n_pred"]) == (3, 3)
    assert LesionCounts(2, 1, 2, 1) + LesionCounts(1, 1, 1, 1) == LesionCounts(3, 2, 3, 2)


def test_case_metrics_from_counts_matches_case_metrics():
    pred, target = _two_lesions_one_hit_one_fp()
    pred, target = pred.astype(np.uint8), target.astype(np.uint8)
    direct = case_metrics(pred, target, [1], lesion_labels=[1])
    rebuilt = case_metrics_from_counts(confusion_counts(pred, target, [1]), {1: lesion_detection(pred, target)})
    assert rebuilt == direct


# ----------------------------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_clearly_better_model():
    a = np.random.default_rng(3).uniform(0.4, 0.8, size=30)
    result = paired_bootstrap(a, a + 0.1, n_resamples=2000)
    assert result["delta"] == pytest.approx(0.1)
    assert result["prob_better"] == 1.0
    assert result["ci_low"] == pytest.approx(0.1) and result["ci_high"] == pytest.approx(0.1)
    assert result["n_cases"] == 30
    worse = paired_bootstrap(a, a - 0.1, n_resamples=2000)
    assert worse["prob_better"] == 0.0 and worse["delta"] == pytest.approx(-0.1)


def test_paired_bootstrap_identical_models():
    a = [0.2, 0.9, 0.5, float("nan"), 0.7]
    result = paired_bootstrap(a, list(a), n_resamples=500)
    assert result["delta"] == 0.0 and result["prob_better"] == 0.0
    assert result["ci_low"] == 0.0 and result["ci_high"] == 0.0


def test_paired_bootstrap_matches_a_loop_and_is_deterministic():
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 1, 15)
    b = a + rng.normal(0.02, 0.1, 15)
    a[3] = np.nan  # left out of A's mean only
    result = paired_bootstrap(a, b, n_resamples=400, seed=7)
    assert result == paired_bootstrap(a, b, n_resamples=400, seed=7)
    assert result["ci_low"] != paired_bootstrap(a, b, n_resamples=400, seed=8)["ci_low"]
    # The same resamples, one at a time with np.nanmean.
    index = np.random.default_rng(7).integers(0, 15, size=(400, 15))
    deltas = np.array([np.nanmean(b[i]) - np.nanmean(a[i]) for i in index])
    assert result["delta"] == pytest.approx(np.nanmean(b) - np.nanmean(a))
    assert result["prob_better"] == pytest.approx(np.mean(deltas > 0))
    assert result["ci_low"] == pytest.approx(np.percentile(deltas, 2.5))
    assert result["ci_high"] == pytest.approx(np.percentile(deltas, 97.5))
    assert 0.0 < result["prob_better"] < 1.0


def test_paired_bootstrap_nan_handling_and_errors():
    # Observed delta is the difference of the two reported means, each leaving out its own NaN cases.
    result = paired_bootstrap([None, 0.5, 0.7], [0.2, 0.6, 0.8], n_resamples=1000)
    assert result["delta"] == pytest.approx((0.2 + 0.6 + 0.8) / 3 - (0.5 + 0.7) / 2)
    # Resamples that draw only the NaN case have no mean and are dropped, not counted as "not better".
    paired = paired_bootstrap([float("nan"), 0.5], [float("nan"), 0.6], n_resamples=1000)
    assert paired["prob_better"] == 1.0 and paired["delta"] == pytest.approx(0.1)
    assert math.isfinite(paired["ci_low"])
    with pytest.raises(ValueError, match="3 cases but b has 2"):
        paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2])



def test_paired_bootstrap_with_labels_bootstraps_the_reported_dice():
    """Two labels; case 0 has no label 2 in truth or prediction (Dice NaN). The reported Dice averages per label
    over cases, then over labels: the bootstrap's delta is the difference of exactly that."""
    target = [np.array([1, 1, 0, 0]), np.array([1, 0, 2, 2]), np.array([0, 1, 2, 0])]
    pred_a = [np.array([1, 0, 0, 0]), np.array([1, 0, 2, 0]), np.array([0, 1, 2, 2])]
    pred_b = [np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), np.array([0, 1, 2, 0])]
    rows_a = [case_metrics(p.astype(np.uint8), t.astype(np.uint8), [1, 2]) for p, t in zip(pred_a, target)]
    rows_b = [case_metrics(p.astype(np.uint8), t.astype(np.uint8), [1, 2]) for p, t in zip(pred_b, target)]
    matrix = lambda rows: [[r["dice/1"], r["dice/2"]] for r in rows]  # noqa: E731
    result = paired_bootstrap(matrix(rows_a), matrix(rows_b), n_resamples=500)
    assert result["delta"] == pytest.approx(summarize(rows_b)["dice"] - summarize(rows_a)["dice"])
    assert result["delta"] == pytest.approx(0.75 - 7 / 9)  # B is worse on the reported Dice ...
    # ... but better on the mean of each case's label average (case 0 has one label, case 1 two): +0.056
    case_mean = paired_bootstrap([r["dice"] for r in rows_a], [r["dice"] for r in rows_b], n_resamples=10)["delta"]
    assert case_mean == pytest.approx(5 / 6 - 7 / 9)
    # one label as a column is the plain per-case bootstrap, resample for resample
    flat = paired_bootstrap([r["dice/1"] for r in rows_a], [r["dice/1"] for r in rows_b], n_resamples=300, seed=3)
    as_labels = paired_bootstrap([[r["dice/1"]] for r in rows_a], [[r["dice/1"]] for r in rows_b], n_resamples=300,
                                 seed=3)
    assert as_labels == flat

# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("method", ["p1", "p2", "p3"])
def test_matches_evalseg_reference_dice_on_task_a(method):
    if not EVALSEG_DIR.is_dir():
        pytest.skip(f"real evalseg files not found at {EVALSEG_DIR} (check out ../shared beside the repo)")
    from medseg.data.evalseg_pickle import read_label_pickle

    reference = json.loads((EVALSEG_DIR / "expected.json").read_text())["reference_methods"][f"TaskA_Example/{method}"]
    task = EVALSEG_DIR / "TaskA_Example"
    cases = []
    for case_id, expected_dice in reference["per_case_dice"].items():
        target = read_label_pickle(task / "GroundTruth" / f"{case_id}.pkl.gz").volume
        pred = read_label_pickle(task / "Predictions" / method / f"{case_id}.pkl.gz").volume
        cases.append(case_metrics(pred, target, [1]))
        assert cases[-1]["dice"] == pytest.approx(expected_dice, abs=5e-7)  # expected.json rounds to 6 places
    summary = summarize(cases)
    assert summary["dice"] == pytest.approx(reference["mean_case_dice"], abs=5e-5)
    assert (summary["n_cases"], summary["n_scored"]) == (reference["cases"], reference["cases_scored"])
    if method == "p1":  # the numbers quoted in the brief
        assert [round(c["dice"], 6) for c in cases] == [0.849659, 0.794905]
        assert round(summary["dice"], 4) == 0.8223


def test_training_batch_counts_pool_over_batches_by_hand():
    """train/dice and train/iou: counts pooled over the epoch's batches (micro), not a mean of per-batch Dice."""
    import torch

    acc = metrics.BatchCounts(2)  # binary: background and foreground
    # batch 1: truth [1,1,1,1] vs prediction [1,1,0,0] -> tp 2, fn 2 (Dice 2/3 on its own)
    acc.update(torch.tensor([[[1, 1], [0, 0]]], dtype=torch.uint8), torch.tensor([[[1, 1], [1, 1]]]))
    # batch 2: empty truth, one false positive -> fp 1, tn 3 (Dice 0 on its own)
    acc.update(torch.tensor([[[0, 1], [0, 0]]], dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.int64))
    assert acc.counts() == {1: metrics.Counts(tp=2, fp=1, fn=2, tn=3)}
    summary = acc.summary()
    assert summary["dice"] == pytest.approx(4 / 7)  # 2*2 / (2*2 + 1 + 2); the mean of per-batch Dice would be 1/3
    assert summary["iou"] == pytest.approx(2 / 5)


def test_training_batch_counts_several_classes_and_empty():
    import torch

    acc = metrics.BatchCounts(3)
    assert math.isnan(acc.summary()["dice"])  # nothing seen: undefined, not 0 or 1
    truth = torch.tensor([[0, 1, 1, 2]])
    pred = torch.tensor([[0, 1, 2, 2]])
    acc.update(pred, truth)
    counts = acc.counts()
    assert counts[1] == metrics.Counts(tp=1, fp=0, fn=1, tn=2) and counts[2] == metrics.Counts(tp=1, fp=1, fn=0, tn=2)
    # per class Dice 2/3 and 2/3 -> mean 2/3; matches the numpy definition on the same maps
    reference = metrics.confusion_counts(pred.numpy(), truth.numpy(), [1, 2])
    assert counts == reference
    assert acc.summary()["dice"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="does not match"):
        acc.update(pred, truth[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        metrics.BatchCounts(1)
