"""The champion registry on a real sqlite MLflow store: what counts as "no champion", and a mirror that never
deletes an earlier champion's files."""
from __future__ import annotations

import sqlite3

import pytest
from mlflow.exceptions import MlflowException

from medseg.registry import Decision, current_champion, mirror_champion
from medseg.tracking import get_client


def test_only_a_missing_model_or_alias_means_no_champion(tmp_path):
    db = tmp_path / "mlflow.db"
    client = get_client(f"sqlite:///{db}")
    assert current_champion(client, "never-registered") is None
    client.create_registered_model("m")
    assert current_champion(client, "m") is None  # registered, but no version holds the alias
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process writing: the store answers "database is locked"
    try:
        with pytest.raises(MlflowException, match="locked"):
            current_champion(client, "m")  # not "no champion": that would promote without the rule
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def _decision(version: str, run_id: str) -> Decision:
    candidate = {"run_id": run_id, "dice": 0.5, "iou": 0.4, "dice_micro": 0.6, "lesion_recall": 0.5,
                 "lesion_precision": 0.5, "n_cases": 2, "n_scored": 2, "split_hash": "abc",
                 "per_case_dice": {"001": 0.5, "002": 0.5}}
    return Decision(promoted=True, alias="champion", reason="promoted: test", registry_name="m", version=version,
                    candidate=candidate)


def test_mirror_keeps_an_existing_version_folder(tmp_path, tiny_cfg):
    cfg = tiny_cfg()
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"first champion")
    second.write_bytes(b"second champion")
    models = tmp_path / "models"
    link = mirror_champion(models, first, cfg, _decision("1", "run-a"))
    assert (link / "checkpoint.pt").read_bytes() == b"first champion"
    # a reset tracking store numbers its versions from 1 again: the earlier v1 folder must survive
    link = mirror_champion(models, second, cfg, _decision("1", "run-b"))
    assert (link / "checkpoint.pt").read_bytes() == b"second champion"
    assert (models / "versions" / "m-v1" / "checkpoint.pt").read_bytes() == b"first champion"
    assert link.resolve() == (models / "versions" / "m-v1-run-b").resolve()
    with pytest.raises(FileExistsError, match="m-v1-run-b"):
        mirror_champion(models, second, cfg, _decision("1", "run-b"))
    assert (link / "checkpoint.pt").read_bytes() == b"second champion"  # the champion link is untouched
