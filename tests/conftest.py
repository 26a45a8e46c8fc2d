"""Shared fixtures: one tiny synthetic task per session, tiny configs, per-test MLflow stores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")



@pytest.fixture(autouse=True)
def _cache_builds_in_one_process(monkeypatch):
    """Auto ``dataset.cache_workers`` decides from the first case's time whether to start processes; on a slow or
    loaded machine even a tiny task could cross the line. Builds in this process stay in it (tests of the worker
    processes set ``cache_workers`` or patch the threshold themselves)."""
    monkeypatch.setattr("medseg.data.cache.PARALLEL_MIN_SECONDS", float("inf"))


TINY_MODEL = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic Kaggle-layout dataset (8 cases, 64 px, 6-10 slices), built once per session."""
    from medseg.data.synthetic import generate_task

    root = tmp_path_factory.mktemp("data")
    generate_task(root, cases=8, size=64, slices=(6, 10), seed=0)
    return root


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config_dict(data_root: Path, cache_dir: Path, work: Path, **sections) -> dict:
    """A complete config for CPU tests: 64 px, a 0.4M-parameter UNet, 2 epochs of 32 slices."""
    cfg = {
        "name": "tiny",
        "dataset": {"format": "kaggle", "path": str(data_root), "task": "Task900_SynthLiverTumor", "labels": [1],
                    "image_size": 64, "cache_dir": str(cache_dir), "split": {"seed": 0, "val_fraction": 0.25}},
        "model": dict(TINY_MODEL),
        "loss": {"name": "bce_dice"},
        "training": {"epochs": 2, "batch_size": 8, "samples_per_epoch": 32, "fg_oversample": 0.5, "lr": 0.003,
                     "seed": 0, "threads": 1, "val_overlays": 1},
        "output": {"run_dir": str(work / "runs"), "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                   "experiment": "tests"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


@pytest.fixture
def tiny_cfg(synth_root, shared_cache, tmp_path):
    """Factory: tiny_cfg(training={"epochs": 3}) -> resolved Config writing into this test's tmp_path."""
    from medseg.config import config_from_dict

    def make(**sections):
        return config_from_dict(tiny_config_dict(synth_root, shared_cache, tmp_path, **sections), source="tiny")

    return make
