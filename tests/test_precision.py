"""training.precision (auto | fp32 | bf16) and training.channels_last: what each resolves to, that training runs in
it, and that prediction stays float32 on the CPU so a checkpoint scores the same on CPUs with and without bf16."""
from __future__ import annotations

import pytest
import torch

from medseg.checkpoint import load_checkpoint, model_from_checkpoint
from medseg.errors import ConfigError
from medseg.evaluation import evaluate_checkpoint
from medseg.models import cpu_native_bf16, prediction_precision, resolve_precision
from medseg.training import build_training, configure_torch, fit, prepare_data

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_native_bf16() is native
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for: emulated where the CPU lacks it
    assert resolve_precision("auto", CPU, amp=False) == "fp32"  # the older switch still turns it off
    assert resolve_precision("bf16", CPU, amp=False) == "fp32"


def test_unknown_precision_is_a_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match="training.precision"):
        tiny_cfg(training={"precision": "fp16"})


def test_training_runs_in_the_resolved_precision_and_memory_format(tiny_cfg, tmp_path):
    """bf16 changes the losses against fp32 (autocast is on); two fp32 runs are equal to the bit; the checkpoint
    records the precision it trained in; every 4-D weight is channels_last when asked."""
    histories = {}
    for name, training in {"fp32": {"precision": "fp32"}, "fp32_again": {"precision": "fp32"},
                           "bf16": {"precision": "bf16"}}.items():
        cfg = tiny_cfg(training={"epochs": 1, **training})
        result = fit(cfg, run_dir=tmp_path / name, progress=False)
        histories[name] = [h["train/loss"] for h in result.history]
        meta = load_checkpoint(result.best_checkpoint)["meta"]
        assert meta["training_precision"] == training["precision"]
    assert histories["fp32"] == histories["fp32_again"]
    assert histories["bf16"] != histories["fp32"]
    cfg = tiny_cfg(training={"channels_last": True})
    parts = build_training(cfg, prepare_data(cfg, progress=False), configure_torch(cfg))
    convs = [p for p in parts.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    cfg = tiny_cfg(training={"channels_last": False})
    parts = build_training(cfg, prepare_data(cfg, progress=False), configure_torch(cfg))
    assert all(p.is_contiguous() for p in parts.model.parameters())


def test_a_bf16_checkpoint_predicts_in_float32_on_the_cpu(tiny_cfg, tmp_path):
    """Validation and eval run float32 whatever the training precision: eval reproduces the validation Dice of a
    bf16-trained checkpoint exactly."""
    cfg = tiny_cfg(training={"epochs": 1, "precision": "bf16"})
    result = fit(cfg, run_dir=tmp_path / "run", progress=False)
    _, _, stored = model_from_checkpoint(result.best_checkpoint)
    assert prediction_precision(stored.training, CPU) == "fp32"
    ev = evaluate_checkpoint(result.best_checkpoint, cfg, progress=False, postprocess=False)
    assert ev.summary["dice"] == pytest.approx(result.best_metrics["val/dice"], abs=1e-9)
