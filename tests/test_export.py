"""medseg.export: the committed deliverable (float16 checkpoint, relative config, metrics, overlays) from a champion."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from medseg.checkpoint import load_checkpoint
from medseg.config import config_from_dict
from medseg.evaluation import evaluate_checkpoint
from medseg.export import export_champion, pick_cases, relative_config
from medseg.training import fit


def test_export_writes_a_half_precision_champion_that_scores_the_same(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"epochs": 1})
    result = fit(cfg, run_dir=tmp_path / "run", progress=False)
    out = tmp_path / "docs" / "champion"
    metrics = export_champion(result.best_checkpoint, cfg, out, root=tmp_path)
    payload = load_checkpoint(out / "checkpoint.pt")  # verifies its digest
    floats = [v for v in payload["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert payload["meta"]["weights_dtype"] == "float16"
    assert (out / "checkpoint.pt").stat().st_size < 0.6 * result.best_checkpoint.stat().st_size
    # the exported weights score what the float32 ones scored, to 3 decimals, and metrics.json says so
    again = evaluate_checkpoint(out / "checkpoint.pt", cfg, progress=False)
    assert (round(again.summary["dice"], 3) == round(metrics["val"]["dice"], 3)
            == round(metrics["val_float32"]["dice"], 3))
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["split_hash"] == payload["meta"]["split_hash"] and stored["weights_dtype"] == "float16"
    # overlays exist for the chosen cases, and the config loads with paths relative to the root
    assert stored["overlays"] and all((out / "overlays" / name).stat().st_size > 1000 for name in stored["overlays"])
    raw = yaml.safe_load((out / "config.yaml").read_text())
    assert config_from_dict(raw, source="exported").model == cfg.model
    assert raw["output"]["tracking_uri"] is None  # the exporter's own store is not part of the deliverable
    root = Path(cfg.dataset.path).parent  # a data folder inside the root is written relative to it
    assert relative_config(cfg, root)["dataset"]["path"] == Path(cfg.dataset.path).name
    assert (out / "eval" / "per_case.csv").is_file()


def test_pick_cases_spans_the_dice_distribution_and_adds_a_lesion_free_case():
    def row(cid, dice, tp, fn):
        return {"case_id": cid, "dice": dice, "tp/1": tp, "fn/1": fn, "fp/1": 0}

    rows = [row("a", 0.9, 9, 1), row("b", 0.1, 1, 9), row("c", 0.5, 5, 5), row("d", float("nan"), 0, 0),
            row("e", 0.7, 7, 3)]
    assert pick_cases(rows, n=3) == ["a", "b", "d"]  # best, worst, and the lesion-free one
    assert pick_cases(rows, n=5)[:4] == ["a", "e", "c", "b"]
