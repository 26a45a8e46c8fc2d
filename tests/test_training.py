"""fit(): reproducibility, checkpoints (self-describing, atomic, refused when tampered), resume, NaN, schedule."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from medseg.errors import CheckpointError, NonFiniteLossError
from medseg.training import epoch_seed, fit, lr_factor, prepare_data

SCORE_KEYS = ("train/loss", "train/dice", "train/iou", "val/loss", "val/dice", "val/iou", "val/dice_micro", "lr")


def _scores(history):
    return [[h[k] for k in SCORE_KEYS] for h in history]


def test_same_config_twice_gives_identical_epoch_metrics(tiny_cfg, tmp_path):
    cfg = tiny_cfg(augment=[{"name": "HorizontalFlip", "p": 0.5}, {"name": "Affine", "rotate": [-10, 10], "p": 0.5}])
    first = fit(cfg, run_dir=tmp_path / "a", progress=False)
    second = fit(cfg, run_dir=tmp_path / "b", progress=False)
    assert len(first.history) == 2
    assert _scores(first.history) == _scores(second.history)  # exact, not approximately equal
    other = fit(tiny_cfg(training={"seed": 1}), run_dir=tmp_path / "c", progress=False)
    assert _scores(other.history) != _scores(first.history)


def test_checkpoint_describes_itself_and_is_the_best_epoch(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"epochs": 3})
    result = fit(cfg, run_dir=tmp_path / "run", progress=False)
    best_epoch = max(result.history, key=lambda h: h["val/dice"])["epoch"]
    assert result.best_epoch == best_epoch
    meta = load_checkpoint(result.best_checkpoint)["meta"]
    assert meta["epoch"] == best_epoch
    assert meta["metrics"]["val/dice"] == pytest.approx(max(h["val/dice"] for h in result.history))
    assert meta["config"]["model"]["encoder"] == cfg.model.encoder
    assert meta["preprocessing"]["image_size"] == 64 and meta["preprocessing"]["window"]["width"] == 400
    assert meta["labels"] == [1] and meta["classes"] == 1 and meta["in_channels"] == 1
    data = prepare_data(cfg, progress=False)
    assert meta["split_hash"] == data.split.hash
    assert {"torch", "segmentation-models-pytorch", "medseg"} <= set(meta["versions"])
    # everything needed to rebuild the model is inside the file
    model, meta2, cfg2 = model_from_checkpoint(result.best_checkpoint)
    assert cfg2.model == cfg.model and not model.training
    for name in ("last.pt", "history.json", "val_per_case.csv", "learning_curve.png", "config.yaml", "splits.json"):
        assert (result.run_dir / name).exists(), name
    assert list((result.run_dir / "overlays").glob("*.png"))
    assert not list(result.run_dir.glob(".*tmp"))  # no temp files left behind


def test_2p5d_context_changes_input_channels(tiny_cfg, tmp_path):
    result = fit(tiny_cfg(dataset={"context_slices": 1}, training={"epochs": 1}), run_dir=tmp_path / "r",
                 progress=False)
    meta = load_checkpoint(result.best_checkpoint)["meta"]
    assert meta["in_channels"] == 3 and meta["preprocessing"]["context_slices"] == 1


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_cfg, tmp_path):
    full = fit(tiny_cfg(training={"epochs": 3}), run_dir=tmp_path / "full", progress=False)
    # interrupted after 2 epochs (the callback stops it), then resumed from last.pt
    part = fit(tiny_cfg(training={"epochs": 3}), run_dir=tmp_path / "part", progress=False,
               on_epoch=lambda r: r.epoch == 2)
    assert part.stop_reason == "callback" and len(part.history) == 2
    resumed = fit(tiny_cfg(training={"epochs": 3}), run_dir=tmp_path / "part", progress=False,
                  resume_state=tmp_path / "part" / "last.pt")
    assert _scores(resumed.history) == _scores(full.history)


def test_ema_weights_are_validated_checkpointed_and_resumed(tiny_cfg, tmp_path):
    from medseg.config import config_from_dict

    cfg = tiny_cfg(training={"epochs": 3, "ema_decay": 0.9})
    full = fit(cfg, run_dir=tmp_path / "full", progress=False)
    raw = fit(tiny_cfg(training={"epochs": 3}), run_dir=tmp_path / "raw", progress=False)
    # the same training steps (same losses), but another model is validated
    assert [h["train/loss"] for h in full.history] == [h["train/loss"] for h in raw.history]
    assert [h["val/loss"] for h in full.history] != [h["val/loss"] for h in raw.history]
    # best.pt holds the average, last.pt the raw weights and the average, both consistent with the history
    state = torch.load(full.run_dir / "last.pt", map_location="cpu", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    assert int(state["ema"]["n_averaged"]) == 3 * cfg.training.samples_per_epoch // cfg.training.batch_size
    weights = load_checkpoint(full.best_checkpoint)["state_dict"]
    if full.best_epoch == 3:
        assert all(torch.equal(weights[k], averaged[k]) for k in weights)
    assert any(not torch.equal(averaged[k], state["model"][k]) for k in averaged if averaged[k].is_floating_point())
    # interrupted after epoch 2 and resumed: identical to the uninterrupted run, average included
    fit(cfg, run_dir=tmp_path / "part", progress=False, on_epoch=lambda r: r.epoch == 2)
    resumed = fit(cfg, run_dir=tmp_path / "part", progress=False, resume_state=tmp_path / "part" / "last.pt")
    assert _scores(resumed.history) == _scores(full.history)
    # a raw-weights state cannot silently resume an averaged run
    with pytest.raises(Exception, match=r"last\.pt: no weight average"):
        fit(cfg, run_dir=tmp_path / "raw2", progress=False, resume_state=tmp_path / "raw" / "last.pt")
    with pytest.raises(Exception, match="ema_decay"):
        config_from_dict({**cfg.to_dict(), "training": {**cfg.to_dict()["training"], "ema_decay": 1.0}},
                         source="x.yaml")


def test_nan_loss_stops_with_a_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"optimizer": "sgd", "lr": 1e12, "epochs": 2})
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+ step \d+: training loss is (nan|inf)"):
        fit(cfg, run_dir=tmp_path / "nan", progress=False)


def test_patience_stops_early(tiny_cfg, tmp_path):
    # a constant monitored value never improves after epoch 1, so patience 1 ends the run after epoch 2
    cfg = tiny_cfg(training={"epochs": 6, "patience": 1, "monitor": "val/n_cases"})
    result = fit(cfg, run_dir=tmp_path / "p", progress=False)
    assert result.stop_reason == "patience" and len(result.history) == 2


def test_interrupted_checkpoint_write_leaves_previous_file(tiny_cfg, tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, {"config": {}, "note": "first"})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, {"config": {}, "note": "second"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_tampered_foreign_and_code_checkpoints_are_refused(tmp_path):
    model = torch.nn.Linear(3, 1)
    path = tmp_path / "ok.pt"
    save_checkpoint(path, model, {"config": {"name": "x"}, "metrics": {"val/dice": 0.5}})
    assert load_checkpoint(path)["meta"]["metrics"]["val/dice"] == 0.5

    payload = torch.load(path, weights_only=True)
    payload["meta"]["metrics"]["val/dice"] = 0.99  # edited claim
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="integrity digest mismatch"):
        load_checkpoint(tmp_path / "edited.pt")

    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["weight"] += 1  # edited weights
    torch.save(payload, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="integrity digest mismatch"):
        load_checkpoint(tmp_path / "weights.pt")

    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a medseg checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": "medseg-checkpoint", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a safe medseg checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()

    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_epoch_seed_mixes_seed_and_epoch_into_32_bits():
    assert epoch_seed(0, 3) == 3 and epoch_seed(2, 0) == 2_000_006
    assert epoch_seed(4294, 7) == 4294 * 1_000_003 + 7  # below 2**32: the product itself
    assert epoch_seed(4295, 0) == 4295 * 1_000_003 - 2**32  # wrapped
    assert 0 <= epoch_seed(-1, 0) < 2**32


def test_lr_schedule_warmup_cosine_and_poly(tiny_cfg):
    cfg = tiny_cfg(training={"epochs": 10, "scheduler": "cosine", "warmup_epochs": 2, "min_lr_ratio": 0.0})
    factors = [lr_factor(e, cfg) for e in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0)  # first epoch after warmup: full LR
    assert factors[2:] == sorted(factors[2:], reverse=True)
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    poly = tiny_cfg(training={"epochs": 10, "scheduler": "poly", "poly_power": 1.0, "min_lr_ratio": 0.0})
    assert [lr_factor(e, poly) for e in (0, 5)] == pytest.approx([1.0, 0.5])


def test_validation_dice_is_per_case_on_whole_volumes(tiny_cfg, tmp_path):
    """The logged val/dice equals the mean over cases of Dice computed on each stacked volume."""
    from medseg import metrics as M
    from medseg.checkpoint import model_from_checkpoint
    from medseg.data.dataset import label_lut
    from medseg.inference import predict_volume

    cfg = tiny_cfg(training={"epochs": 1})
    result = fit(cfg, run_dir=tmp_path / "r", progress=False)
    data = prepare_data(cfg, progress=False)
    model, meta, _ = model_from_checkpoint(result.best_checkpoint)
    lut = label_lut([1])
    dices = []
    for cid in data.split.val:
        pred, _ = predict_volume(model, data.cache.image(cid), context=0, device=torch.device("cpu"), batch_size=3)
        target = lut[np.asarray(data.cache.label(cid))]
        inter = np.logical_and(pred == 1, target == 1).sum()
        total = (pred == 1).sum() + (target == 1).sum()
        if total:
            dices.append(2 * inter / total)
    assert result.best_metrics["val/dice"] == pytest.approx(float(np.mean(dices)), abs=1e-9)
    rows = json.loads((tmp_path / "r" / "history.json").read_text())
    assert rows[0]["val/n_cases"] == len(data.split.val)
    assert M.mean_per_case_dice(dices)[1] == rows[0]["val/n_scored"]
