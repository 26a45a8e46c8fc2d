"""Kills at every write (issue 14, guarantee 1): a real child process SIGKILLed at a seeded random point while it
writes a best checkpoint, builds the slice cache or promotes a champion (registry version, mirror, alias on a real
sqlite MLflow store) leaves the previous state loadable, never a torn file that is picked up, and the next write or
decision tidies what it left (``benchmarks/reliability_kills.py``; 20 kills a kind in ``bench_reliability.py``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from benchmarks import reliability_kills as kills
from medseg.io_utils import atomic_write_text, remove_dead_writers_temp_files
from medseg.registry import JOURNAL, reconcile_champion
from medseg.tracking import get_client


def _check(result: dict, n: int) -> None:
    assert result["enough_kills"], result
    for kind, r in result["by_kind"].items():
        assert r["kills_mid_write"] >= n, (kind, r)
        assert r["broken"] == [] and r["kept"] == r["tries"], (kind, r["broken"])
        assert r["temp_left_after_next_write"] == 0, (kind, r)
    assert result["nothing_lost"]


def test_one_kill_mid_write_of_each_kind_keeps_the_previous_state():
    _check(kills.run(quick=True, kills=1), 1)


@pytest.mark.slow
def test_five_kills_mid_write_of_each_kind_keep_the_previous_state():
    result = kills.run(quick=True)
    _check(result, kills.QUICK_KILLS)
    # kills did land after the temp files were created (a kill before that leaves nothing to tidy), and the next
    # write removed them (``temp_left_after_next_write`` is 0, checked above)
    assert result["by_kind"]["checkpoint"]["temp_left_by_kills"] >= 1
    assert result["by_kind"]["cache"]["temp_left_by_kills"] >= 1
    # the checkpoint is always one of the two complete files, the cache absent or complete
    assert set(result["by_kind"]["checkpoint"]["states"]) <= {"previous", "new"}
    assert set(result["by_kind"]["cache"]["states"]) <= {"absent", "complete"}


def test_the_next_write_removes_only_temp_files_of_dead_writers(tmp_path):
    host = socket.gethostname().split(".")[0]
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    dead = tmp_path / f".best.pt.{dead_pid}@{host}.x1.tmp"
    alive = tmp_path / f".best.pt.{os.getpid()}@{host}.x2.tmp"  # a writer still at work
    other_host = tmp_path / f".best.pt.{dead_pid}@{host}-elsewhere.x3.tmp"  # a shared folder: not ours to judge
    other_file = tmp_path / f".last.pt.{dead_pid}@{host}.x4.tmp"
    for path in (dead, alive, other_host, other_file):
        path.write_text("partial")
    assert remove_dead_writers_temp_files(tmp_path / "best.pt") == [dead]
    atomic_write_text(tmp_path / "last.pt", "complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other_host.name, "last.pt"])


def test_reconcile_drops_the_journal_of_a_promotion_killed_before_it_registered(tmp_path):
    models = tmp_path / "models"
    (models / "versions" / "tiny-v1").mkdir(parents=True)
    os.symlink("versions/tiny-v1", models / "champion")
    (models / JOURNAL).write_text('{"registry_name": "tiny", "run_id": "r2", "version": null, '
                                  '"previous_link": "versions/tiny-v1"}')
    (models / ".staging-abc").mkdir()
    client = get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = reconcile_champion(client, models)
    assert "undid the interrupted promotion of tiny run r2 (no version registered)" in done
    assert os.readlink(models / "champion") == "versions/tiny-v1"
    assert sorted(p.name for p in models.iterdir()) == ["champion", "versions"]
    assert reconcile_champion(client, models) is None  # nothing left to repair
