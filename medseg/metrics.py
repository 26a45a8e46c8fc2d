"""The one definition of every segmentation metric: training validation, evaluation, tuning and reports use these.

Two stages, as in segmentation_models_pytorch:

1. counts from whole label volumes -- ``confusion_counts`` (tp/fp/fn/tn per foreground label value) and
   ``lesion_detection`` (3D connected components);
2. pure reductions of counts with explicit zero-division handling: a metric whose denominator is 0 is
   ``float('nan')``, never 0 or 1, so that callers decide what an undefined value means.

Conventions (nnU-Net / evalseg "mean_case_dice"):

- Dice and IoU are computed per case on the whole volume, label value L against everything else.
- A case whose truth and prediction are both empty for L has Dice NaN and is left out of the mean over cases
  (``summarize`` reports how many: ``n_empty_empty``). Empty truth with a non-empty prediction scores 0
  (tp=0, fp>0), and is counted.
- "micro" metrics pool the counts of all cases before reducing; they weigh large organs more.
- Several labels: each label is reduced on its own, then the per-label results are averaged (macro over labels).

Keys are flat and JSON-friendly: ``dice``, ``dice/<label>``, ``tp/<label>``, ... (see ``case_metrics`` and
``summarize``). NaN is kept as a float NaN (``json.dumps`` writes ``NaN``; MLflow accepts it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Voxels per chunk in confusion_counts: chunking keeps the temporaries (joint codes, the nonzero selection,
# bincount's cast to intp) at tens of MB instead of gigabytes for a 512x512x900 volume.
_CHUNK_VOXELS = 1 << 22

# Label maps whose values all lie in 0..255 (every uint8 volume, and any integer volume of few labels) are
# counted on their values directly: one joint code per voxel, target * (K+1) + pred, in uint8/uint16.
# Larger values (unusual: int16/int32 ids) are first mapped to label codes, by a lookup table up to 2**16 and
# by a binary search beyond.
_MAX_DIRECT_VALUE = 255
_MAX_LUT_VALUE = 1 << 16

METRIC_NAMES = ("dice", "iou", "sensitivity", "precision")
COUNT_NAMES = ("tp", "fp", "fn", "tn")
LESION_COUNT_NAMES = ("n_true", "n_true_detected", "n_pred", "n_pred_correct")


# ----------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Counts:
    """Voxel confusion counts of one label value L against the rest, for one case (or pooled over cases)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Counts) -> Counts:
        # Pooling: micro metrics over cases, or accumulating a volume's counts slice by slice during validation.
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def _check_label_maps(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
    for name, arr in (("prediction", pred), ("target", target)):
        if not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    return pred, target


def _check_labels(labels: Sequence[int]) -> list[int]:
    label_list = [int(label) for label in labels]
    if not label_list:
        raise ValueError("labels is empty: name at least one foreground label value, e.g. [1]")
    if len(set(label_list)) != len(label_list):
        raise ValueError(f"labels contains duplicates: {label_list}")
    if min(label_list) < 0:
        raise ValueError(f"labels must be non-negative label values, got {label_list}")
    return label_list


def _value_range(arr: np.ndarray) -> tuple[int, int]:
    if arr.size == 0:
        return 0, 0
    if arr.dtype == np.bool_:
        return 0, 1
    return int(arr.min()), int(arr.max())  # ~0.03 ns a voxel: far cheaper than the counting pass


def _chunks(arr: np.ndarray, n_voxels: int) -> Iterable[np.ndarray]:
    """Flat C-order chunks of about n_voxels voxels; slices of a C-contiguous array are views, not copies."""
    arr = np.atleast_1d(arr)
    inner = int(np.prod(arr.shape[1:], dtype=np.int64))
    step = max(1, n_voxels // max(inner, 1))
    for start in range(0, arr.shape[0], step):
        yield arr[start : start + step].reshape(-1)


def _joint_histogram(pred: np.ndarray, target: np.ndarray, n_values: int,
                     to_code: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(n_values, n_values) int64 matrix: entry [t, p] counts voxels with target code t and predicted code p.

    Codes are the values themselves, or ``to_code(chunk)`` (intp codes < n_values) when given.
    """
    joint_dtype = np.uint8 if n_values * n_values <= 1 << 8 else np.uint16 if n_values * n_values <= 1 << 16 \
        else np.intp
    histogram = np.zeros(n_values * n_values, dtype=np.int64)
    for target_chunk, pred_chunk in zip(_chunks(target, _CHUNK_VOXELS), _chunks(pred, _CHUNK_VOXELS)):
        if to_code is not None:
            target_chunk, pred_chunk = to_code(target_chunk), to_code(pred_chunk)
        joint = target_chunk.astype(joint_dtype)  # a copy: modified in place below
        joint *= n_values
        np.add(joint, pred_chunk, out=joint, casting="unsafe")  # values < n_values: the cast cannot wrap
        # Most voxels are background in both (code 0): bincount only the rest, and get [0, 0] by subtraction.
        histogram += np.bincount(joint[joint != 0], minlength=n_values * n_values)
    histogram[0] = pred.size - histogram[1:].sum()
    return histogram.reshape(n_values, n_values)


def _label_coder(label_list: list[int], max_value: int) -> Callable[[np.ndarray], np.ndarray]:
    """Function mapping a chunk of label values (all <= max_value) to codes 0 (rest) or i+1 (label_list[i])."""
    if max_value < _MAX_LUT_VALUE:
        lut = np.zeros(max_value + 1, dtype=np.uint8 if len(label_list) < 255 else np.intp)
        for code, label in enumerate(label_list, start=1):
            if label <= max_value:
                lut[label] = code
        return lambda chunk: lut[chunk]

    # Values too large for a table (int32/int64 ids): the same codes by binary search, slower.
    order = np.argsort(label_list)
    sorted_labels = np.asarray(label_list, dtype=np.int64)[order]
    sorted_codes = (order + 1).astype(np.intp)

    def to_code(chunk: np.ndarray) -> np.ndarray:
        values = chunk.astype(np.int64, copy=False)
        pos = np.minimum(np.searchsorted(sorted_labels, values), len(sorted_labels) - 1)
        return np.where(sorted_labels[pos] == values, sorted_codes[pos], 0)

    return to_code


def confusion_counts(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> dict[int, Counts]:
    """Per-label voxel confusion counts of a predicted label map against the target label map.

    Args:
        pred: integer (or bool) label map, any shape, e.g. (X, Y, Z) uint8 with values 0..K.
        target: integer (or bool) label map of the same shape.
        labels: foreground label values to score, e.g. ``[1]`` or ``[1, 2, ..., 8]``. Each value L is scored
            as "L vs rest"; values present in the volumes but not listed are simply "rest".

    Returns:
        ``{L: Counts(tp, fp, fn, tn)}`` in the order of ``labels``; counts are Python ints summing to ``pred.size``.

    Raises:
        ValueError: shapes differ (the message names both), a non-integer dtype, negative values, or bad labels.

    Cost: one (K+1) x (K+1) joint histogram of ``target * (K+1) + pred`` by ``np.bincount`` over the voxels
    that are not background in both (about 0.3 s for 512x512x900 uint8 on one core); no Python loop over labels
    touches the voxels.
    """
    pred, target = _check_label_maps(pred, target)
    label_list = _check_labels(labels)
    lo_p, hi_p = _value_range(pred)
    lo_t, hi_t = _value_range(target)
    if min(lo_p, lo_t) < 0:
        raise ValueError(f"label maps must be non-negative, got minimum {min(lo_p, lo_t)}")
    max_value = max(hi_p, hi_t)

    if max_value <= _MAX_DIRECT_VALUE:
        # Rows and columns are label values; a label above every voxel value has no row (no voxels).
        matrix = _joint_histogram(pred, target, max_value + 1)
        index = {label: label for label in label_list if label <= max_value}
    else:
        # Rows and columns are label codes: 0 = any value not in labels ("rest"), i+1 = label_list[i].
        matrix = _joint_histogram(pred, target, len(label_list) + 1, _label_coder(label_list, max_value))
        index = {label: code for code, label in enumerate(label_list, start=1)}

    return _counts_from_matrix(matrix, index, label_list, int(pred.size))


def _counts_from_matrix(matrix: np.ndarray, index: Mapping[int, int], labels: Sequence[int],
                        total: int) -> dict[int, Counts]:
    """``{L: Counts}`` from a joint histogram ``matrix[truth code, predicted code]``; ``index`` maps each label to its
    code (a label without a code has no voxels)."""
    counts: dict[int, Counts] = {}
    for label in labels:
        if label not in index:
            counts[label] = Counts(tp=0, fp=0, fn=0, tn=total)
            continue
        row = index[label]
        tp = int(matrix[row, row])
        fp = int(matrix[:, row].sum()) - tp  # predicted L, truth something else
        fn = int(matrix[row, :].sum()) - tp  # truth L, predicted something else
        counts[label] = Counts(tp=tp, fp=fp, fn=fn, tn=total - tp - fp - fn)
    return counts


class BatchCounts:
    """Voxel confusion counts pooled over the batches of a training epoch (micro over the epoch's patches).

    ``update`` takes (N, H, W) class-index maps as torch tensors (prediction thresholded or argmaxed as in
    validation, target as the loss sees it) and adds their joint histogram on the tensors' own device, so a GPU step
    is not synchronised; ``counts`` reads it once, at the end of the epoch. Classes are 0 (background) .. n_classes-1;
    class c > 0 is scored as "c vs rest", like a label value in ``confusion_counts``.
    """

    def __init__(self, n_classes: int):
        if n_classes < 2:
            raise ValueError(f"n_classes counts the background too: at least 2, got {n_classes}")
        self.n_classes = n_classes
        self._histogram = None  # torch int64 (n_classes * n_classes,), on the first batch's device

    def update(self, pred, target) -> None:
        import torch

        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        joint = target.reshape(-1).long() * self.n_classes + pred.reshape(-1).long()
        histogram = torch.bincount(joint, minlength=self.n_classes * self.n_classes)
        self._histogram = histogram if self._histogram is None else self._histogram + histogram

    def counts(self) -> dict[int, Counts]:
        """``{class: Counts}`` for the foreground classes 1..n_classes-1 (all zero before any update)."""
        classes = list(range(1, self.n_classes))
        if self._histogram is None:
            return {c: Counts(0, 0, 0, 0) for c in classes}
        matrix = self._histogram.cpu().numpy().reshape(self.n_classes, self.n_classes)
        return _counts_from_matrix(matrix, {c: c for c in classes}, classes, int(matrix.sum()))

    def summary(self) -> dict[str, float]:
        """``dice`` and ``iou`` from the pooled counts of each class, averaged over classes (NaN when every class
        is empty in both truth and prediction)."""
        counts = self.counts().values()
        return {"dice": _nanmean(dice(c) for c in counts)[0], "iou": _nanmean(iou(c) for c in counts)[0]}


# ----------------------------------------------------------------------------------------------- reductions


def _ratio(numerator: int, denominator: int) -> float:
    return float("nan") if denominator == 0 else numerator / denominator


def dice(c: Counts) -> float:
    """Dice = 2 tp / (2 tp + fp + fn); NaN when truth and prediction are both empty (denominator 0)."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def iou(c: Counts) -> float:
    """IoU (Jaccard) = tp / (tp + fp + fn); NaN when truth and prediction are both empty."""
    return _ratio(c.tp, c.tp + c.fp + c.fn)


def sensitivity(c: Counts) -> float:
    """Sensitivity (recall) = tp / (tp + fn); NaN when the truth is empty."""
    return _ratio(c.tp, c.tp + c.fn)


def precision(c: Counts) -> float:
    """Precision = tp / (tp + fp); NaN when the prediction is empty."""
    return _ratio(c.tp, c.tp + c.fp)


_REDUCTIONS = {"dice": dice, "iou": iou, "sensitivity": sensitivity, "precision": precision}


def _nanmean(values: Iterable[float | None]) -> tuple[float, int]:
    # None is accepted as NaN because per-case tables read back from JSON hold null for empty-empty cases.
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return (float(np.mean(finite)) if finite else float("nan")), len(finite)


def mean_per_case_dice(per_case_dice: Sequence[float | None]) -> tuple[float, int]:
    """Mean of per-case Dice leaving out NaN / None (empty-empty) cases.

    Args:
        per_case_dice: one Dice per case, shape (n_cases,); NaN or None for a case left out.

    Returns:
        ``(mean, n_scored)``; the mean is NaN when no case is scored.
    """
    return _nanmean(per_case_dice)


# ----------------------------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection counts for one case (or pooled over cases); see ``lesion_detection``."""

    n_true: int  # ground-truth connected components
    n_true_detected: int  # of those, detected
    n_pred: int  # predicted connected components
    n_pred_correct: int  # of those, correct detections

    def __add__(self, other: LesionCounts) -> LesionCounts:
        return LesionCounts(
            self.n_true + other.n_true,
            self.n_true_detected + other.n_true_detected,
            self.n_pred + other.n_pred,
            self.n_pred_correct + other.n_pred_correct,
        )

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in LESION_COUNT_NAMES}


def lesion_recall(c: LesionCounts) -> float:
    """Detected true lesions / true lesions; NaN when there is no true lesion."""
    return _ratio(c.n_true_detected, c.n_true)


def lesion_precision(c: LesionCounts) -> float:
    """Correct predicted components / predicted components; NaN when nothing is predicted."""
    return _ratio(c.n_pred_correct, c.n_pred)


def _covered_fraction_ok(labelled: np.ndarray, n_components: int, own_mask: np.ndarray, other_mask: np.ndarray,
                         min_overlap: float) -> int:
    """How many of the components in ``labelled`` have at least ``min_overlap`` of their voxels in ``other_mask``."""
    if n_components == 0:
        return 0
    # Boolean indexing selects only foreground voxels, so both bincounts cost O(foreground), not O(volume).
    sizes = np.bincount(labelled[own_mask], minlength=n_components + 1)[1:]
    covered = np.bincount(labelled[own_mask & other_mask], minlength=n_components + 1)[1:]
    # Compare the ratio, not covered >= min_overlap * size: 0.28 * 25 is 7.000000000000001 in floating point,
    # which would reject exactly 7 of 25 voxels, whereas 7 / 25 rounds to the same double as 0.28.
    return int(np.count_nonzero(covered / sizes >= min_overlap))


def foreground_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a bool mask as slices, None when empty; np.any projections, ~30x faster than find_objects."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a bool mask with full connectivity (26 in 3D, 8 in 2D), as ``lesion_detection`` and
    evalseg count lesions: (int32 labels, 1..n for the components and 0 for background; n)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, n = ndimage.label(mask, structure=structure)
    return labelled, int(n)


def lesion_detection(pred_mask: np.ndarray, target_mask: np.ndarray, *, min_overlap: float = 0.1) -> LesionCounts:
    """Lesion-wise detection counts over connected components.

    Definition: lesions are the connected components of the ground-truth mask and of the predicted mask, with
    full connectivity (26-connectivity in 3D, 8 in 2D: voxels touching by a face, an edge or a corner belong to
    the same component), matching the evalseg segments, which are 3D components. A ground-truth lesion counts
    as detected when at least ``min_overlap`` (default 10%) of its voxels are predicted foreground; a predicted
    component counts as a correct detection when at least ``min_overlap`` of its voxels are ground-truth
    foreground. Lesion recall = detected / true lesions (NaN when there are no true lesions); lesion
    precision = correct / predicted components (NaN when there are none).

    Args:
        pred_mask: predicted foreground, any shape, e.g. (X, Y, Z); nonzero = foreground.
        target_mask: ground-truth foreground, same shape.
        min_overlap: fraction in (0, 1]; "at least" is inclusive (3 of 30 voxels meets 0.1, 2 do not).

    Returns:
        ``LesionCounts(n_true, n_true_detected, n_pred, n_pred_correct)``.

    Cost: the volumes are first cropped to the bounding box of the union of both masks (one pass), then one
    ``ndimage.label`` per mask and bincounts over foreground voxels; no per-component full-volume masks.
    """
    pred_mask, target_mask = np.asarray(pred_mask), np.asarray(target_mask)
    if pred_mask.shape != target_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} does not match target shape {target_mask.shape}")
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    pred_mask = np.atleast_1d(pred_mask.astype(bool, copy=False))
    target_mask = np.atleast_1d(target_mask.astype(bool, copy=False))

    # Lesions are small next to a CT volume: label only the box holding all foreground. No component crosses
    # the box edge, since no foreground lies outside it.
    box = foreground_box(pred_mask | target_mask)
    if box is None:
        return LesionCounts(0, 0, 0, 0)
    pred_mask, target_mask = pred_mask[box], target_mask[box]

    labelled_true, n_true = label_components(target_mask)  # full connectivity
    n_true_detected = _covered_fraction_ok(labelled_true, n_true, target_mask, pred_mask, min_overlap)
    del labelled_true  # free before labelling the prediction: large when the foreground box is large
    labelled_pred, n_pred = label_components(pred_mask)
    n_pred_correct = _covered_fraction_ok(labelled_pred, n_pred, pred_mask, target_mask, min_overlap)
    return LesionCounts(int(n_true), n_true_detected, int(n_pred), n_pred_correct)


# ----------------------------------------------------------------------------------------------- per case


def case_metrics_from_counts(counts: Mapping[int, Counts],
                             lesion_counts: Mapping[int, LesionCounts] | None = None) -> dict[str, float | int]:
    """Per-case metric dict from counts already computed (e.g. summed slice by slice during validation).

    Args:
        counts: ``{label: Counts}`` for one whole case, as from ``confusion_counts``.
        lesion_counts: optional ``{label: LesionCounts}`` for some of those labels.

    Returns:
        Flat dict, for every label L: ``dice/L``, ``iou/L``, ``sensitivity/L``, ``precision/L`` (NaN when
        undefined), ``tp/L``, ``fp/L``, ``fn/L``, ``tn/L``; for lesion labels also ``lesion_n_true/L``,
        ``lesion_n_true_detected/L``, ``lesion_n_pred/L``, ``lesion_n_pred_correct/L``, ``lesion_recall/L``,
        ``lesion_precision/L``; and the convenience means over labels (NaN-aware, NaN if all NaN) ``dice``,
        ``iou``, ``sensitivity``, ``precision``.
    """
    if not counts:
        raise ValueError("counts is empty: a case needs at least one label")
    lesion_counts = dict(lesion_counts or {})
    unknown = sorted(set(lesion_counts) - set(counts))
    if unknown:
        raise ValueError(f"lesion labels {unknown} are not among the scored labels {sorted(counts)}")

    row: dict[str, float | int] = {}
    for name, reduce in _REDUCTIONS.items():
        per_label = [reduce(c) for c in counts.values()]
        row[name] = _nanmean(per_label)[0]
    for label, c in counts.items():
        for name, reduce in _REDUCTIONS.items():
            row[f"{name}/{label}"] = reduce(c)
        for name, value in c.as_dict().items():
            row[f"{name}/{label}"] = value
    for label, lc in lesion_counts.items():
        for name, value in lc.as_dict().items():
            row[f"lesion_{name}/{label}"] = value
        row[f"lesion_recall/{label}"] = lesion_recall(lc)
        row[f"lesion_precision/{label}"] = lesion_precision(lc)
    return row


def case_metrics(pred: np.ndarray, target: np.ndarray, labels: Sequence[int], *,
                 lesion_labels: Sequence[int] | None = None, min_overlap: float = 0.1) -> dict[str, float | int]:
    """All metrics of one case: whole-volume counts per label, their reductions, optional lesion detection.

    Args:
        pred, target: integer label maps of one whole case, same shape, e.g. (X, Y, Z) uint8.
        labels: foreground label values, each scored as "L vs rest".
        lesion_labels: labels (a subset of ``labels``) whose connected components are also scored for
            lesion-wise detection (see ``lesion_detection``); None for none.
        min_overlap: passed to ``lesion_detection``.

    Returns:
        The flat dict described in ``case_metrics_from_counts``; ``summarize`` takes a list of them.
    """
    counts = confusion_counts(pred, target, labels)
    lesion_counts: dict[int, LesionCounts] = {}
    pred, target = np.asarray(pred), np.asarray(target)
    for label in [int(label) for label in (lesion_labels or [])]:
        if label not in counts:
            raise ValueError(f"lesion label {label} is not among the scored labels {list(counts)}")
        lesion_counts[label] = lesion_detection(pred == label, target == label, min_overlap=min_overlap)
    return case_metrics_from_counts(counts, lesion_counts)


# ----------------------------------------------------------------------------------------------- over cases


def _labels_with(row: Mapping[str, object], prefix: str) -> list[int]:
    return sorted(int(key.split("/", 1)[1]) for key in row if key.startswith(prefix + "/"))


def summarize(per_case: Sequence[Mapping[str, object]]) -> dict[str, float | int]:
    """Aggregate per-case metric dicts (from ``case_metrics``) into one flat, JSON-friendly summary.

    Only the counts in each case dict are read (``tp/L`` ... and ``lesion_n_*/L``), so dicts read back from a
    CSV or JSON table give the same summary; other keys (a case id, say) are ignored.

    Returns, with L over the labels (macro mean over labels when there are several):
        dice, iou: mean over cases of per-case Dice / IoU, leaving out cases where Dice is NaN (truth and
            prediction both empty). A case with empty truth and a non-empty prediction scores 0 and counts.
        dice_micro, iou_micro: from the counts summed over all cases.
        sensitivity, precision: micro, from the summed counts.
        n_cases: number of cases; n_scored: cases with at least one label scored; n_empty_empty: cases where
            every label is empty in both truth and prediction (n_cases = n_scored + n_empty_empty).
        lesion_recall, lesion_precision, lesion_n_true, lesion_n_pred: pooled over cases (only when the cases
            carry lesion counts).
        Per label, only when there is more than one label: ``dice/L``, ``iou/L``, ``dice_micro/L``,
            ``iou_micro/L``, ``sensitivity/L``, ``precision/L``, ``n_scored/L``, ``n_empty_empty/L`` and, with
            lesions, ``lesion_recall/L``, ``lesion_precision/L``, ``lesion_n_true/L``, ``lesion_n_pred/L``.
    """
    labels, lesion_labels = _summary_labels(per_case)
    per_label: dict[int, dict[str, float | int]] = {}
    case_scored = np.zeros(len(per_case), dtype=bool)
    for label in labels:
        per_label[label], scored = _label_summary(per_case, label)
        case_scored |= scored
    for label in lesion_labels:
        per_label[label].update(_lesion_summary(per_case, label))

    summary: dict[str, float | int] = {}
    for name in ("dice", "iou", "dice_micro", "iou_micro", "sensitivity", "precision"):
        summary[name] = _nanmean(per_label[label][name] for label in labels)[0]
    if lesion_labels:
        for name in ("lesion_recall", "lesion_precision"):
            summary[name] = _nanmean(per_label[label][name] for label in lesion_labels)[0]
        for name in ("lesion_n_true", "lesion_n_pred"):
            summary[name] = sum(int(per_label[label][name]) for label in lesion_labels)
    summary["n_cases"] = len(per_case)
    summary["n_scored"] = int(case_scored.sum())
    summary["n_empty_empty"] = len(per_case) - int(case_scored.sum())
    if len(labels) > 1:
        for label in labels:
            for name, value in per_label[label].items():
                summary[f"{name}/{label}"] = value
    return summary


def _summary_labels(per_case: Sequence[Mapping[str, object]]) -> tuple[list[int], list[int]]:
    """(labels, lesion labels) that every case dict carries counts for; ValueError when they differ or are none."""
    if not per_case:
        raise ValueError("summarize needs at least one case")
    labels = _labels_with(per_case[0], "tp")
    lesion_labels = _labels_with(per_case[0], "lesion_n_true")
    for index, row in enumerate(per_case):
        if _labels_with(row, "tp") != labels or _labels_with(row, "lesion_n_true") != lesion_labels:
            raise ValueError(f"case {index} has labels {_labels_with(row, 'tp')} (lesions "
                             f"{_labels_with(row, 'lesion_n_true')}); case 0 has {labels} (lesions {lesion_labels})")
    if not labels:
        raise ValueError("the per-case dicts carry no counts (tp/<label> keys); build them with case_metrics")
    return labels, lesion_labels


def _label_summary(per_case: Sequence[Mapping[str, object]],
                   label: int) -> tuple[dict[str, float | int], np.ndarray]:
    """One label's summary over the cases, and which cases it scores (Dice defined): (dict, (n_cases,) bool)."""
    counts = [Counts(*(int(row[f"{name}/{label}"]) for name in COUNT_NAMES))  # type: ignore[arg-type]
              for row in per_case]
    case_dice = [dice(c) for c in counts]
    mean_dice, n_scored = _nanmean(case_dice)
    pooled = sum(counts, Counts(0, 0, 0, 0))
    summary = {
        "dice": mean_dice,
        "iou": _nanmean(iou(c) for c in counts)[0],  # IoU is NaN exactly when Dice is: same cases left out
        "dice_micro": dice(pooled),
        "iou_micro": iou(pooled),
        "sensitivity": sensitivity(pooled),
        "precision": precision(pooled),
        "n_scored": n_scored,
        "n_empty_empty": len(per_case) - n_scored,
    }
    return summary, ~np.isnan(case_dice)


def _lesion_summary(per_case: Sequence[Mapping[str, object]], label: int) -> dict[str, float | int]:
    """One label's lesion detection pooled over the cases."""
    pooled = sum((LesionCounts(*(int(row[f"lesion_{name}/{label}"])  # type: ignore[arg-type]
                                 for name in LESION_COUNT_NAMES)) for row in per_case),
                 LesionCounts(0, 0, 0, 0))
    return {"lesion_recall": lesion_recall(pooled), "lesion_precision": lesion_precision(pooled),
            "lesion_n_true": pooled.n_true, "lesion_n_pred": pooled.n_pred}


# ----------------------------------------------------------------------------------------------- comparison


def paired_bootstrap(a, b, *, n_resamples: int = 10000, seed: int = 0) -> dict[str, float | int]:
    """Paired bootstrap of the difference in mean per-case score between model B and model A.

    Args:
        a, b: per-case scores (e.g. Dice) of two models on the same cases in the same order, shape (n_cases,),
            or (n_cases, n_labels) for several labels; NaN or None = left out of that mean, as in
            ``mean_per_case_dice``. With labels, the statistic is the one ``summarize`` reports: per label the
            mean over cases, then the mean over labels (not the mean of each case's label average, which
            differs when a case has no Dice for some label).
        n_resamples: bootstrap resamples; each draws n_cases case indices with replacement, the same indices
            for both models (that pairing is what makes it a paired test).
        seed: seeds ``np.random.default_rng``; the same inputs and seed give the same result.

    Returns:
        ``delta``: observed statistic(b) - statistic(a); ``prob_better``: fraction of resamples whose delta > 0
        (among resamples where both are defined); ``ci_low``, ``ci_high``: 2.5 / 97.5 percentiles of the
        resampled deltas; ``n_cases``; ``n_resamples``.
    """
    scores_a, scores_b = _paired_scores(a, b)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n_cases, n_labels = scores_a.shape
    valid_a, valid_b = ~np.isnan(scores_a), ~np.isnan(scores_b)
    filled_a, filled_b = np.where(valid_a, scores_a, 0.0), np.where(valid_b, scores_b, 0.0)
    observed = float(_bootstrap_statistic(filled_b, valid_b) - _bootstrap_statistic(filled_a, valid_a))

    # every resample through one index matrix, in blocks bounded to ~32 MB for large test sets
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, (1 << 22) // (n_cases * n_labels))
    deltas = np.empty(n_resamples)
    for start in range(0, n_resamples, rows_per_block):
        stop = min(start + rows_per_block, n_resamples)
        index = rng.integers(0, n_cases, size=(stop - start, n_cases))
        deltas[start:stop] = (_bootstrap_statistic(filled_b[index], valid_b[index])
                              - _bootstrap_statistic(filled_a[index], valid_a[index]))
    deltas = deltas[~np.isnan(deltas)]
    if deltas.size == 0:
        prob_better = ci_low = ci_high = float("nan")
    else:
        prob_better = float(np.mean(deltas > 0))
        ci_low, ci_high = (float(q) for q in np.percentile(deltas, [2.5, 97.5]))
    return {"delta": observed, "prob_better": prob_better, "ci_low": ci_low, "ci_high": ci_high,
            "n_cases": int(n_cases), "n_resamples": int(n_resamples)}


def _score_matrix(values) -> np.ndarray:
    """Per-case scores (scalars or per-label rows; None = NaN) -> (n_cases, n_labels) float."""
    rows = [[np.nan if v is None else v for v in (row if isinstance(row, (list, tuple, np.ndarray)) else [row])]
            for row in values]
    return np.array(rows, dtype=float).reshape(len(rows), -1) if rows else np.zeros((0, 1))


def _paired_scores(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Both models' (n_cases, n_labels) score matrices; ValueError unless they score the same, non-zero cases."""
    scores_a, scores_b = _score_matrix(a), _score_matrix(b)
    if scores_a.shape != scores_b.shape:
        if scores_a.shape[0] != scores_b.shape[0]:
            raise ValueError(f"a has {scores_a.shape[0]} cases but b has {scores_b.shape[0]}: they must score the "
                             "same cases")
        raise ValueError(f"a has shape {scores_a.shape}, b {scores_b.shape}")
    if scores_a.shape[0] == 0:
        raise ValueError("paired_bootstrap needs at least one case")
    return scores_a, scores_b


def _bootstrap_statistic(filled: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(..., n_cases, n_labels) -> (...): per label the mean over scored cases, then the mean over labels."""
    with np.errstate(invalid="ignore", divide="ignore"):  # nothing scored -> NaN, left out or dropped
        per_label = filled.sum(axis=-2) / valid.sum(axis=-2)
        counted = ~np.isnan(per_label)
        return np.where(counted, per_label, 0.0).sum(axis=-1) / counted.sum(axis=-1)
