"""Post-processing chosen on validation, as nnU-Net does: per label, drop small predicted components, keep only the
largest one, or empty a case whose largest component is small, when that raises the mean per-case validation Dice.

After training, ``fit`` predicts the validation cases with the best checkpoint (at the cached resolution), and
``choose`` tries, for every label on its own:

- ``none``: the prediction as it is;
- ``keep_largest``: only the largest predicted connected component of the label;
- ``remove_below`` *k*: predicted components of fewer than *k* voxels removed, for each *k* of ``candidate_sizes``:
  quantiles (``QUANTILES``) of the sizes of the training masks' lesions of that label, in voxels at the cached
  resolution;
- ``empty_case_below`` *k*: every predicted component of the label removed from a case whose largest one has fewer
  than *k* voxels (the case is then called free of that label), with *k* an eighth, a quarter and half the smallest
  "largest lesion" of a training case (``case_candidate_sizes``): the "any lesion" decision of each case, as
  segmentation challenges with many negative images (e.g. SIIM-ACR pneumothorax) post-process. A lesion-free case
  with a false positive scores Dice 0, however small the false positive; removing small components cannot reach false
  positives as big as small true lesions, the case gate can, as long as the case's largest component is small.

Components are 3D with 26-connectivity (``medseg.metrics.label_components``, as lesion-wise detection counts them);
removed voxels become background. The operation with the highest mean per-case Dice of the label is chosen when it
beats ``none`` by at least ``min_gain`` and lowers the label's validation lesion recall (pooled over cases, a true
lesion detected when >= 10% of it is predicted, as ``metrics.lesion_detection``) by at most ``max_recall_drop``.
(Without that guard, removing components up to the training lesions' 25% size quantile removed every false positive
of lesion-free cases but also small true lesions: held-out recall 0.55 -> 0.38.) Otherwise the largest case gate
that costs no validation Dice and no lesion recall is chosen, if any, else ``none``: a gate changes only cases whose
largest component is small and gains only on cases without lesions, of which a validation split may hold too few to
show it (the embedded task's 14 validation cases hold 2, the held-out twin's 40 hold 10).
Labels are independent: an operation on one changes no other label's voxels, and the reported Dice is the mean over
labels of each label's mean per-case Dice (as ``metrics.summarize``).

Each predicted component is labelled once per case; every candidate is then scored from the components' sizes and
their overlap with the truth, without touching the volumes again, so the selection costs one labelling per case.

The choice (``postprocessing`` in the checkpoint metadata) is applied by ``inference.Predictor`` (eval.py, infer.py)
to predictions at the input's own size: a ``min_voxels`` counted at the cached in-plane size S is scaled by the
ratio of the slice areas (H * W) / S^2.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.metrics import label_components

QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5)  # of the training lesions' sizes: the smallest, ..., the median
CASE_FRACTIONS = (0.125, 0.25, 0.5)  # of the smallest largest-lesion of a training case (empty_case_below)
MIN_GAIN = 0.005  # mean per-case Dice a post-processing must add (on a label) to be chosen over none
MAX_RECALL_DROP = 0.05  # validation lesion recall a post-processing may cost (on a label)
MIN_OVERLAP = 0.1  # a true lesion is detected when this share of it is predicted (metrics.lesion_detection)


# --------------------------------------------------------------------------------------------- components


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the connected components of a bool mask (any order)."""
    labelled, n = label_components(np.asarray(mask, bool))
    return np.bincount(labelled.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, np.int64)


def candidate_sizes(masks: Iterable[np.ndarray], quantiles: Sequence[float] = QUANTILES) -> list[int]:
    """Distinct thresholds *k* (>= 2: below 1 removes nothing) from quantiles of the component sizes of ``masks``
    (one bool volume per training case), rounded down to whole voxels."""
    return _quantile_sizes(np.concatenate([component_sizes(m) for m in masks] or [np.zeros(0, np.int64)]), quantiles)


def case_candidate_sizes(masks: Iterable[np.ndarray], fractions: Sequence[float] = CASE_FRACTIONS) -> list[int]:
    """Thresholds *k* of ``empty_case_below``: fractions of the smallest "largest lesion" of the training cases (each
    case with lesions has one at least that big; a detection may cover only part of it), rounded down, distinct,
    >= 2. Never above half that size, so a case whose largest lesion is as small as any seen in training is kept
    when at least half of it is predicted."""
    largest = [int(s.max()) for s in (component_sizes(m) for m in masks) if s.size]
    if not largest:
        return []
    return sorted({k for k in (int(math.floor(min(largest) * f)) for f in fractions) if k >= 2})


def _quantile_sizes(sizes: np.ndarray, quantiles: Sequence[float]) -> list[int]:
    if sizes.size == 0:
        return []
    values = np.floor(np.quantile(sizes, list(quantiles))).astype(int)
    return sorted({int(v) for v in values if v >= 2})


@dataclass(frozen=True)
class _CaseStats:
    """One case and label, by predicted component: its size and voxels inside the truth; and the overlap of each
    (predicted, true) component pair, to count which true lesions stay detected when components are removed."""

    sizes: np.ndarray  # voxels of each predicted component
    overlaps: np.ndarray  # of them inside the truth
    truth: int  # truth voxels
    pair_pred: np.ndarray  # 0-based predicted component of each overlapping (predicted, true) pair
    pair_true: np.ndarray  # 0-based true component of the pair
    pair_voxels: np.ndarray  # voxels the pair shares
    true_sizes: np.ndarray  # voxels of each true component


def _case_stats(pred: np.ndarray, target: np.ndarray) -> _CaseStats:
    labelled, n = label_components(pred)
    sizes = np.bincount(labelled[pred], minlength=n + 1)[1:]
    both = pred & target
    overlaps = np.bincount(labelled[both], minlength=n + 1)[1:]
    true_labelled, n_true = label_components(target)
    true_sizes = np.bincount(true_labelled[target], minlength=n_true + 1)[1:]
    pairs, counts = np.unique(np.stack([labelled[both], true_labelled[both]]), axis=1, return_counts=True)
    return _CaseStats(sizes, overlaps, int(np.count_nonzero(target)), pairs[0] - 1, pairs[1] - 1, counts, true_sizes)


def _recall(op: dict[str, Any], stats: list[_CaseStats]) -> float:
    """Lesion recall of one label after ``op``, pooled over cases (NaN without true lesions)."""
    detected = total = 0
    for st in stats:
        keep = _kept(op, st.sizes)
        covered = np.bincount(st.pair_true[keep[st.pair_pred]], weights=st.pair_voxels[keep[st.pair_pred]],
                              minlength=st.true_sizes.size)
        detected += int(np.count_nonzero(covered / np.maximum(st.true_sizes, 1) >= MIN_OVERLAP))
        total += st.true_sizes.size
    return detected / total if total else math.nan


def _costs_nothing(scored: tuple[float, float, dict[str, Any]], dice_before: float, recall_before: float) -> bool:
    """Does an operation keep the validation Dice and lesion recall at least at these values?"""
    dice, recall = scored[0], scored[1]
    same_dice = dice >= dice_before - 1e-12 if not math.isnan(dice_before) else math.isnan(dice)
    same_recall = math.isnan(recall_before) or recall >= recall_before - 1e-12
    return same_dice and same_recall


def _dice(tp: int, predicted: int, truth: int) -> float:
    """Dice, NaN when truth and prediction are both empty (left out of the mean, as ``metrics.dice``)."""
    return 2.0 * tp / (predicted + truth) if predicted + truth else math.nan


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _kept(op: dict[str, Any], sizes: np.ndarray) -> np.ndarray:
    """Which components an operation keeps, from their sizes."""
    if op["op"] == "remove_below":
        return sizes >= op["min_voxels"]
    if op["op"] == "keep_largest":
        keep = np.zeros(sizes.shape, bool)
        if sizes.size:
            keep[int(np.argmax(sizes))] = True
        return keep
    if op["op"] == "empty_case_below":
        return np.full(sizes.shape, bool(sizes.size) and int(sizes.max()) >= op["min_voxels"])
    return np.ones(sizes.shape, bool)


def _score(op: dict[str, Any], stats: list[_CaseStats]) -> float:
    """Mean per-case Dice of one label after ``op``."""
    dices = []
    for st in stats:
        keep = _kept(op, st.sizes)
        dices.append(_dice(int(st.overlaps[keep].sum()), int(st.sizes[keep].sum()), st.truth))
    return _mean(dices)


# ------------------------------------------------------------------------------------------------- choice


def choose(predictions: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], labels: Sequence[int],
           sizes: Mapping[int, Sequence[int]], *, case_sizes: Mapping[int, Sequence[int]] | None = None,
           min_gain: float = MIN_GAIN, max_recall_drop: float = MAX_RECALL_DROP) -> dict[str, Any]:
    """The post-processing of each label that maximises its mean per-case Dice over ``predictions``.

    Args:
        predictions, targets: per case, class maps of the same shape (class i + 1 = ``labels[i]``, 0 background).
        labels: the label values, in class order.
        sizes: per label value, the ``remove_below`` thresholds to try (``candidate_sizes`` of its training masks).
        case_sizes: per label value, the ``empty_case_below`` thresholds (``case_candidate_sizes``); none: not tried.
        min_gain: a label's best operation is kept only when it adds at least this much to its mean Dice; without
            one, the largest case gate (``empty_case_below``) that costs no Dice and no lesion recall is kept.
        max_recall_drop: operations that lower the label's lesion recall by more than this are not eligible.

    Returns:
        ``{"labels": {"<label>": {"op": ..., ["min_voxels": k,] "dice_before", "dice_after", "recall_before",
        "recall_after", "tried": {name: Dice}, "recall": {name: lesion recall}}}, "dice_before", "dice_after",
        "min_gain", "max_recall_drop", "cases"}``; ``dice_*`` are means over labels of the mean per-case Dice.
    """
    ids = sorted(predictions)
    chosen: dict[str, Any] = {}
    for index, label in enumerate(labels, start=1):
        stats = [_case_stats(np.asarray(predictions[c]) == index, np.asarray(targets[c]) == index) for c in ids]
        ops = [{"op": "none"}, {"op": "keep_largest"}]
        ops += [{"op": "remove_below", "min_voxels": int(k)} for k in sizes.get(label, [])]
        ops += [{"op": "empty_case_below", "min_voxels": int(k)} for k in (case_sizes or {}).get(label, [])]
        scores = [(_score(op, stats), _recall(op, stats), op) for op in ops]
        before, recall_before = scores[0][0], scores[0][1]
        floor = recall_before - max_recall_drop - 1e-9
        eligible = [s for s in scores[1:] if math.isnan(recall_before) or s[1] >= floor]
        best_score, best_recall, best = max(eligible, key=lambda s: -math.inf if math.isnan(s[0]) else s[0],
                                            default=(math.nan, math.nan, None))
        take = (best is not None and not math.isnan(best_score)
                and (math.isnan(before) or best_score >= before + min_gain))
        if not take or best["op"] == "empty_case_below":
            # the largest case gate as good as the best one, or, when nothing gains, as good as none
            reference = (best_score, best_recall) if take else (before, recall_before)
            gates = [s for s in scores if s[2]["op"] == "empty_case_below" and _costs_nothing(s, *reference)]
            if gates:
                (best_score, best_recall, best), take = gates[-1], True
        op = best if take else {"op": "none"}
        chosen[str(label)] = {**op, "dice_before": before, "dice_after": best_score if take else before,
                              "recall_before": recall_before, "recall_after": best_recall if take else recall_before,
                              "tried": {describe_op(o): s for s, _, o in scores},
                              "recall": {describe_op(o): r for _, r, o in scores}}
    return {"labels": chosen, "dice_before": _mean(v["dice_before"] for v in chosen.values()),
            "dice_after": _mean(v["dice_after"] for v in chosen.values()), "min_gain": min_gain,
            "max_recall_drop": max_recall_drop, "cases": len(ids)}


def select_for_run(predictions: Mapping[str, np.ndarray], data, *, min_gain: float = MIN_GAIN) -> dict[str, Any]:
    """``choose`` for a training run: the targets and the training lesions' sizes from ``data`` (training.PreparedData),
    at the cached resolution. Adds ``seconds`` (the time it took) and ``image_size``."""
    from medseg.data.dataset import label_lut

    started = time.perf_counter()
    lut = label_lut(data.labels)
    targets = {cid: lut[np.asarray(data.cache.label(cid))] for cid in predictions}
    sizes: dict[int, list[int]] = {}
    case_sizes: dict[int, list[int]] = {}
    for index, label in enumerate(data.labels, start=1):
        masks = [lut[np.asarray(data.cache.label(cid))] == index for cid in data.split.train]
        sizes[label], case_sizes[label] = candidate_sizes(masks), case_candidate_sizes(masks)
    choice = choose(predictions, targets, data.labels, sizes, case_sizes=case_sizes, min_gain=min_gain)
    choice["image_size"] = int(data.cache.settings["image_size"])
    choice["seconds"] = round(time.perf_counter() - started, 3)
    return choice


# -------------------------------------------------------------------------------------------------- apply


def apply(volume: np.ndarray, choice: Mapping[str, Any] | None, *, voxel_scale: float = 1.0) -> np.ndarray:
    """``volume`` (raw label values, e.g. (X, Y, Z) uint8) with the chosen operation of each label applied; removed
    voxels become 0. ``voxel_scale``: voxels of ``volume`` per voxel of the resolution the choice was made at."""
    if not choice or not active(choice):
        return volume
    out = np.array(volume, copy=True)
    for label, op in choice["labels"].items():
        if op["op"] == "none":
            continue
        mask = out == int(label)
        labelled, n = label_components(mask)
        if n == 0:
            continue
        sizes = np.bincount(labelled[mask], minlength=n + 1)[1:]
        scaled = {**op, "min_voxels": op["min_voxels"] * voxel_scale} if "min_voxels" in op else op
        keep = _kept(scaled, sizes)
        drop = np.concatenate([[False], ~keep])  # index 0: background, left alone
        out[mask & drop[labelled]] = 0
    return out


def active(choice: Mapping[str, Any] | None) -> bool:
    """Does the choice change anything (an operation other than none on some label)?"""
    return bool(choice) and any(op.get("op") != "none" for op in choice.get("labels", {}).values())


def describe_op(op: Mapping[str, Any]) -> str:
    if op["op"] in ("remove_below", "empty_case_below"):
        return f"{op['op']}_{op['min_voxels']}"
    return str(op["op"])


def describe(choice: Mapping[str, Any] | None) -> str:
    """One line: ``label 1: remove components < 17 voxels (val Dice 0.6012 -> 0.6240)``, or ``none (...)``."""
    if not choice:
        return "none (not chosen for this checkpoint)"
    parts = []
    for label, op in choice["labels"].items():
        what = ({"none": "none", "keep_largest": "keep the largest component"}.get(op["op"])
                or (f"empty the case when its largest component < {op['min_voxels']} voxels"
                    if op["op"] == "empty_case_below" else f"remove components < {op['min_voxels']} voxels"))
        parts.append(f"label {label}: {what}")
    return f"{'; '.join(parts)} (val Dice {choice['dice_before']:.4f} -> {choice['dice_after']:.4f})"
