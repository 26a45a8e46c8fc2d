"""Post-processing chosen on validation (medseg/postprocess.py): hand-computed choices, storage, application,
tracking."""
from __future__ import annotations

import numpy as np
import pytest

from medseg import postprocess as P
from medseg.checkpoint import load_checkpoint, update_checkpoint_meta
from medseg.evaluation import run_eval_cli
from medseg.inference import Predictor
from medseg.registry import Decision, model_card
from medseg.tracking import get_client, tracking_uri, train_tracked
from medseg.training import prepare_data


def _box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


SHAPE = (12, 12, 12)


def _cases():
    """A: truth a 3x3x4 box (36 voxels), prediction a 3x3x3 box inside it (27) plus a false 2-voxel component.
    B: two true lesions, 27 and 8 voxels, predicted exactly."""
    truth_a = _box(SHAPE, slice(1, 4), slice(1, 4), slice(1, 5))
    pred_a = _box(SHAPE, slice(1, 4), slice(1, 4), slice(1, 4)) | _box(SHAPE, slice(9, 10), slice(9, 10), slice(9, 11))
    truth_b = _box(SHAPE, slice(1, 4), slice(1, 4), slice(1, 4)) | _box(SHAPE, slice(8, 10), slice(8, 10), slice(8, 10))
    preds = {"a": pred_a.astype(np.uint8), "b": truth_b.astype(np.uint8)}
    return preds, {"a": truth_a.astype(np.uint8), "b": truth_b.astype(np.uint8)}


def test_components_are_26_connected_and_sizes_give_quantile_thresholds():
    corner = np.zeros((3, 3, 3), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touching by a corner only: one lesion, as lesion-wise detection counts
    assert P.component_sizes(corner).tolist() == [2]
    # training lesions of 4, 8 and 27 voxels: quantiles 0, .05, .1, .25, .5 -> 4, 4.4, 4.8, 6, 8 -> floor, distinct
    masks = [_box(SHAPE, slice(0, 2), slice(0, 2), slice(0, 1)) | _box(SHAPE, slice(5, 7), slice(5, 7), slice(5, 7)),
             _box(SHAPE, slice(0, 3), slice(0, 3), slice(0, 3))]
    assert P.candidate_sizes(masks) == [4, 6, 8]
    assert P.candidate_sizes([np.zeros(SHAPE, bool)]) == []


def test_removing_a_small_false_component_is_chosen_with_the_computed_dice():
    preds, truths = _cases()
    choice = P.choose(preds, truths, [1], {1: [4, 6, 8]})
    label = choice["labels"]["1"]
    # A: before 2*27 / (29 + 36) = 54/65, after 54/63; B: 1 before and after (its 8-voxel lesion is >= every k)
    assert label["dice_before"] == pytest.approx((54 / 65 + 1) / 2)
    assert label["op"] == "remove_below" and label["min_voxels"] == 4  # the smallest of the equally good sizes
    assert label["dice_after"] == pytest.approx((54 / 63 + 1) / 2) == choice["dice_after"]
    # keep-largest fixes A the same way but loses B's small lesion: 2*27 / (27 + 35) = 54/62
    assert label["tried"]["keep_largest"] == pytest.approx((54 / 63 + 54 / 62) / 2)
    # applied to the volumes, the choice gives exactly the scored Dice
    out = P.apply(preds["a"], choice)
    assert int(out.sum()) == 27 and P.apply(preds["b"], choice).sum() == preds["b"].sum()


def test_keep_largest_that_lowers_dice_is_not_chosen():
    preds, truths = _cases()
    one = {"b": preds["b"]}, {"b": truths["b"]}
    choice = P.choose(*one, [1], {1: []})
    assert choice["labels"]["1"]["op"] == "none" and choice["dice_after"] == choice["dice_before"] == 1.0
    assert choice["labels"]["1"]["tried"]["keep_largest"] == pytest.approx(54 / 62)
    # a size that removes the real 8-voxel lesion lowers it too: none again
    assert P.choose(*one, [1], {1: [9]})["labels"]["1"]["op"] == "none"
    # a gain below min_gain is not taken
    # gain (54/63 - 54/65) / 2 = 0.0132
    assert P.choose(preds, truths, [1], {1: [4]}, min_gain=0.02)["labels"]["1"]["op"] == "none"


def test_a_size_that_costs_more_lesion_recall_than_allowed_is_not_chosen():
    """C: a small true lesion (2 voxels, predicted) and two false 2-voxel components; a big lesion predicted exactly.
    remove_below 3 removes the three small components: Dice 2*29/(33+29)=58/62 -> 54/56, but lesion recall
    2/2 -> 1/2. Allowed a recall drop of 0.05 it is refused; allowed 0.5 it is taken."""
    big = _box(SHAPE, slice(1, 4), slice(1, 4), slice(1, 4))
    small = _box(SHAPE, slice(6, 7), slice(6, 7), slice(6, 8))
    false = _box(SHAPE, slice(9, 10), slice(0, 1), slice(0, 2)) | _box(SHAPE, slice(0, 1), slice(9, 10), slice(9, 11))
    preds, truths = {"c": (big | small | false).astype(np.uint8)}, {"c": (big | small).astype(np.uint8)}
    strict = P.choose(preds, truths, [1], {1: [3]})["labels"]["1"]
    assert strict["tried"]["remove_below_3"] == pytest.approx(54 / 56)
    assert strict["recall"] == {"none": 1.0, "keep_largest": 0.5, "remove_below_3": 0.5}
    assert strict["op"] == "none" and strict["recall_after"] == 1.0
    loose = P.choose(preds, truths, [1], {1: [3]}, max_recall_drop=0.5)["labels"]["1"]
    # (keep_largest ties with remove_below 3 here; the first of equal Dice is taken)
    assert loose["op"] == "keep_largest" and loose["dice_after"] == pytest.approx(54 / 56)
    assert loose["recall_after"] == 0.5
    # false positives of a lesion-free case removed at no cost in recall: taken (case B keeps its two lesions)
    b_preds, b_truths = _cases()
    mixed = P.choose({"b": b_preds["b"], "d": false.astype(np.uint8)}, {"b": b_truths["b"], "d": 0 * b_truths["b"]},
                     [1], {1: [3]})["labels"]["1"]
    assert mixed["op"] == "remove_below" and mixed["recall_before"] == mixed["recall_after"] == 1.0
    assert mixed["dice_before"] == pytest.approx(0.5) and mixed["dice_after"] == 1.0  # d: 0 before, NaN after


def test_case_gate_sizes_come_from_the_smallest_largest_training_lesion():
    # largest lesions of the cases with any: 8 (a case of 4 + 8 voxels) and 27; a lesion-free case has none
    masks = [_box(SHAPE, slice(0, 2), slice(0, 2), slice(0, 1)) | _box(SHAPE, slice(5, 7), slice(5, 7), slice(5, 7)),
             _box(SHAPE, slice(0, 3), slice(0, 3), slice(0, 3)), np.zeros(SHAPE, bool)]
    assert P.case_candidate_sizes(masks) == [2, 4]  # an eighth (1: removes nothing), a quarter and half of 8
    assert P.case_candidate_sizes(masks, fractions=(0.5, 1.0)) == [4, 8]
    assert P.case_candidate_sizes([np.zeros(SHAPE, bool)]) == []


def test_a_lesion_free_case_is_emptied_when_its_largest_component_is_below_the_gate():
    """B: lesions of 27 and 8 voxels, predicted exactly; D: lesion-free, one false 12-voxel component. Removing
    components below 13 would empty D too, but loses B's 8-voxel lesion (recall 1 -> 0.5: refused); the case gate
    at 13 keeps all of B (its largest is 27) and empties D: Dice (1 + 0) / 2 -> 1 (D: NaN, no truth, no prediction)."""
    preds, truths = _cases()
    false = _box(SHAPE, slice(8, 10), slice(0, 2), slice(0, 3))  # 12 voxels
    preds, truths = {"b": preds["b"], "d": false.astype(np.uint8)}, {"b": truths["b"], "d": 0 * truths["b"]}
    label = P.choose(preds, truths, [1], {1: [13]}, case_sizes={1: [13]})["labels"]["1"]
    # remove_below 13: B loses its 8-voxel lesion (2*27 / (27 + 35)), D is emptied (NaN)
    assert label["tried"]["remove_below_13"] == pytest.approx(54 / 62) and label["recall"]["remove_below_13"] == 0.5
    assert label["op"] == "empty_case_below" and label["min_voxels"] == 13
    assert label["dice_before"] == pytest.approx(0.5) and label["dice_after"] == 1.0
    assert label["recall_before"] == label["recall_after"] == 1.0
    # gates that gain equally: the largest (it removes the most)
    assert P.choose(preds, truths, [1], {1: []}, case_sizes={1: [13, 20]})["labels"]["1"]["min_voxels"] == 20
    # without gate candidates: nothing else helps within the recall guard
    assert P.choose(preds, truths, [1], {1: [13]})["labels"]["1"]["op"] == "none"
    choice = {"labels": {"1": {"op": "empty_case_below", "min_voxels": 13}}}
    assert P.apply(preds["d"], choice).sum() == 0 and P.apply(preds["b"], choice).tolist() == preds["b"].tolist()
    # at twice the in-plane size (voxel_scale 4) the gate is 52 voxels: B's largest (27) is below it too
    assert P.apply(preds["b"], choice, voxel_scale=4.0).sum() == 0
    assert "empty the case when its largest component < 13 voxels" in P.describe({**choice, "dice_before": 0.5,
                                                                                     "dice_after": 1.0})


def test_without_a_gain_the_largest_case_gate_that_costs_nothing_is_kept():
    """Only case B (lesions of 27 and 8 voxels, predicted exactly): no operation can gain. Gates at 4, 8 and 27 keep B
    as it is (its largest component has 27 voxels), the gate at 28 empties it: the largest free one, 27, is kept."""
    preds, truths = _cases()
    one = {"b": preds["b"]}, {"b": truths["b"]}
    label = P.choose(*one, [1], {1: [9]}, case_sizes={1: [4, 8, 27, 28]})["labels"]["1"]
    assert label["op"] == "empty_case_below" and label["min_voxels"] == 27
    assert label["dice_after"] == label["dice_before"] == 1.0 and label["recall_after"] == 1.0
    assert label["tried"]["empty_case_below_28"] == 0.0 and label["tried"]["remove_below_9"] < 1.0
    # a gate that costs Dice is never free; a gain elsewhere wins over a free gate
    assert P.choose(*one, [1], {1: []}, case_sizes={1: [28]})["labels"]["1"]["op"] == "none"
    gained = P.choose(*_cases(), [1], {1: [4]}, case_sizes={1: [8]})["labels"]["1"]
    assert gained["op"] == "remove_below" and gained["min_voxels"] == 4


def test_apply_scales_sizes_to_the_input_resolution_and_keeps_other_labels():
    preds, _ = _cases()
    volume = preds["b"] * 2  # label value 2: the 27- and 8-voxel lesions
    volume[0, 11, 11] = 1  # a 1-voxel component of another label
    choice = {"labels": {"2": {"op": "remove_below", "min_voxels": 4}}}
    assert P.apply(volume, choice).tolist() == volume.tolist()  # 8 >= 4
    # at twice the cached in-plane size, 4 cached voxels are 16: the 8-voxel lesion goes, label 1 stays
    out = P.apply(volume, choice, voxel_scale=4.0)
    assert int((out == 2).sum()) == 27 and out[0, 11, 11] == 1
    assert P.apply(volume, None) is volume and P.describe(None).startswith("none")


def test_training_chooses_stores_tracks_and_eval_applies_it(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"epochs": 1, "val_overlays": 0})
    result, run_id = train_tracked(cfg, progress=False)
    choice = result.postprocessing
    assert choice["dice_before"] == pytest.approx(result.best_metrics["val/dice"], abs=1e-12)  # the same predictions
    assert choice["dice_after"] >= choice["dice_before"]
    assert choice["cases"] == len(prepare_data(cfg, progress=False).split.val)
    stored = load_checkpoint(result.best_checkpoint)["meta"]["postprocessing"]
    assert stored["labels"] == choice["labels"] and stored["image_size"] == 64
    client = get_client(tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.data.tags["postprocessing"] == P.describe(choice)
    assert run.data.metrics["val/dice_postprocessed"] == pytest.approx(choice["dice_after"])
    assert run.data.metrics["val/dice_before_postprocessing"] == pytest.approx(choice["dice_before"])
    assert "postprocessing.json" in {a.path for a in client.list_artifacts(run_id)}

    # a checkpoint carrying a post-processing that removes every component: eval.py and infer.py's Predictor apply it
    remove_all = {"op": "remove_below", "min_voxels": 10**9, "dice_before": 0.0, "dice_after": 0.0}
    update_checkpoint_meta(result.best_checkpoint, {"postprocessing": {**choice, "labels": {"1": remove_all}}})
    data = prepare_data(cfg, progress=False)
    image = data.source.load(data.split.val[0]).image
    raw = Predictor(result.best_checkpoint, device="cpu", postprocess=False).predict(image)
    assert raw.any()  # an untrained model predicts some foreground
    assert not Predictor(result.best_checkpoint, device="cpu").predict(image).any()
    text = run_eval_cli(cfg, ckpt=result.best_checkpoint, out=tmp_path / "ev", mlflow=False)
    assert "post-processing chosen on validation: label 1: remove components < 1000000000 voxels" in text
    assert ", applied" in text


def test_model_card_shows_the_post_processing(tiny_cfg):
    choice = {"labels": {"1": {"op": "remove_below", "min_voxels": 17}}, "dice_before": 0.6, "dice_after": 0.625}
    candidate = {"run_id": "r", "dice": 0.61, "iou": 0.5, "dice_micro": 0.6, "lesion_recall": 0.5,
                 "lesion_precision": 0.5, "n_cases": 10, "n_scored": 10, "split_hash": "abc", "postprocessing": choice}
    card = model_card(Decision(promoted=True, alias="champion", reason="promoted: test", registry_name="m", version="1",
                               candidate=candidate), tiny_cfg())
    assert ("- Post-processing (chosen on validation after training, applied by eval.py and infer.py, included in the "
            "scores below): label 1: remove components < 17 voxels (val Dice 0.6000 -> 0.6250)") in card
