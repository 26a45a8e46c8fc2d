#!/usr/bin/env python
"""Kills at every write (issue 14, guarantee 1): a process SIGKILLed at a random point while it writes a best
checkpoint (``save_checkpoint``), builds the slice cache (``build_cache``) or promotes a champion (registry version,
``models/champion`` mirror, alias: ``registry.publish_decision``) must leave the previous state loadable, and no
half-written file may ever be picked up.

Each try: the previous state is in place; a child process imports what it needs, prints ``ready``, does the one
write, prints ``done``; the parent SIGKILLs it a random time after ``ready`` (seeded: uniform over 1.1 times the
write's own duration, measured first by an uninterrupted child; after a try whose write had already finished, over
that try's delay at most, since the write took less: the measured first write can be slower than the next ones, by
more on one CPU than another), and counts the try as a kill mid-write only when ``done`` had not been printed.
Then, as the next user would, it checks:

- checkpoint: ``best.pt`` loads (its sha256 digest verified) and is the previous checkpoint or the new one, nothing
  else; the next write removes the temp file the killed writer left (``io_utils.remove_dead_writers_temp_files``).
- cache: the previous (32 px) cache still loads; the new (64 px) one is absent or complete and byte-identical to an
  uninterrupted build; the next ``build_cache`` completes it, equal to that build, and removes the killed build's
  temp folder.
- promotion: before any repair, ``models/champion/checkpoint.pt`` and the checkpoint behind the ``champion`` alias
  both load; after ``registry.reconcile_champion`` (which the next decision runs first, under the champion lock) the
  alias and the mirror name the same version, no version is left ``promoted=pending``, no staging folder, temporary
  link or journal is left.

``run(quick)`` is the kills section of benchmarks/bench_reliability.py (20 kills mid-write per kind; ``quick``: 5).

  python benchmarks/reliability_kills.py [--kills N] [--kinds checkpoint cache promotion]

Tested by tests/test_kills.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.reliability_concurrency import child_env
from benchmarks.reliability_disk import _config, _dataset, previous_loads

KINDS = ("checkpoint", "cache", "promotion")
KILLS, QUICK_KILLS = 20, 5  # kills that landed mid-write, per kind
SEED = 14
REGISTRY = "tiny"
ENTRY = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------- states and writes


def _model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))  # a 2 MB checkpoint


def _client(root: Path):
    from medseg.tracking import get_client

    return get_client(f"sqlite:///{root / 'mlflow.db'}")


def _candidate(run_id: str, dice: float) -> dict[str, Any]:
    return {"run_id": run_id, "dice": dice, "iou": dice * 0.8, "dice_micro": dice, "lesion_recall": None,
            "lesion_precision": None, "n_cases": 2, "n_scored": 2, "split_hash": "kills"}


def logged_candidate(root: Path, i: int) -> tuple[str, Path]:
    """A run with its best.pt logged as ``checkpoint/best.pt`` (what a study's trial leaves): (run id, local file)."""
    from medseg.checkpoint import save_checkpoint

    client = _client(root)
    experiment = client.get_experiment_by_name("kills")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "kills", artifact_location=(root / "artifacts").as_uri())
    path = save_checkpoint(root / "candidates" / f"c{i}" / "best.pt", _model(i), {"candidate": i})
    run = client.create_run(experiment_id, run_name=f"c{i}")
    client.log_artifact(run.info.run_id, str(path), artifact_path="checkpoint")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, path


def promote(root: Path, run_id: str, checkpoint: Path, i: int) -> None:
    """What a decision that promotes does once it has judged: under the champion lock, repair, then publish."""
    from filelock import FileLock

    from medseg.registry import CHAMPION, Decision, publish_decision, reconcile_champion

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    client = _client(root)
    decision = Decision(promoted=True, alias=CHAMPION, reason=f"promoted: candidate {i}", registry_name=REGISTRY,
                        version=None, candidate=_candidate(run_id, 0.5 + i / 1000))
    with FileLock(str(models / ".champion.lock")):
        reconcile_champion(client, models)
        publish_decision(client, decision, checkpoint, _config(root), models)


def setup(kind: str, root: Path) -> None:
    """The state a kind's tries start from (once per kind)."""
    if kind == "cache":
        from medseg.data.cache import build_cache
        from medseg.data.synthetic import generate_task

        generate_task(root / "data", cases=4, size=64, slices=(6, 8), seed=0)
        build_cache(_dataset(root, 32), progress=False)
    elif kind == "promotion":
        run_id, path = logged_candidate(root, 0)
        promote(root, run_id, path, 0)


def before_try(kind: str, root: Path, i: int) -> dict[str, Any]:
    """Put the previous state of try ``i`` in place; what the child needs to know."""
    if kind == "checkpoint":
        from medseg.checkpoint import save_checkpoint

        save_checkpoint(root / "disk" / "run" / "best.pt", _model(0), {"epoch": 1})
        return {}
    if kind == "cache":
        import shutil

        folder = new_cache_folder(root)
        if folder.exists():
            shutil.rmtree(folder)
        return {}
    run_id, path = logged_candidate(root, i)
    return {"run_id": run_id, "checkpoint": str(path)}


def write(kind: str, root: Path, job: dict[str, Any]) -> None:
    """The write a kill interrupts (in the child)."""
    if kind == "checkpoint":
        from medseg.checkpoint import save_checkpoint

        save_checkpoint(root / "disk" / "run" / "best.pt", _model(job["i"]), {"epoch": 2, "try": job["i"]})
    elif kind == "cache":
        from medseg.data.cache import build_cache

        build_cache(_dataset(root, 64), progress=False)
    elif kind == "promotion":
        promote(root, job["run_id"], Path(job["checkpoint"]), job["i"])
    else:
        raise ValueError(kind)


def _warm(kind: str, root: Path) -> None:
    """Everything the write imports or opens lazily, before ``ready`` (so a kill lands in the write, not an import)."""
    import medseg.checkpoint  # noqa: F401

    if kind == "cache":
        import medseg.data.cache  # noqa: F401
        from medseg.data.sources import open_source_from_config

        open_source_from_config(_dataset(root, 64))
    elif kind == "promotion":
        import filelock  # noqa: F401

        import medseg.registry  # noqa: F401

        _config(root)
        _client(root).search_registered_models()


# ------------------------------------------------------------------------------------------------- checks


def new_cache_folder(root: Path) -> Path:
    from medseg.data.cache import prep_dir_for
    from medseg.data.sources import open_source_from_config

    dataset = _dataset(root, 64)
    return prep_dir_for(dataset, open_source_from_config(dataset))


def _tree_digest(folder: Path) -> str:
    """sha256 over the relative paths and bytes of the cache's arrays (``.npy``): what training reads."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.npy")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def temp_leftovers(root: Path) -> list[str]:
    """Temp files and folders of writers (``atomic_path``'s ``.<name>.<pid>@<host>.*.tmp``, the cache's
    ``.<folder>.tmp-<pid>``, the mirror's ``.staging-*`` and ``.champion.*.tmp``), anywhere under ``root``."""
    found = []
    for path in root.rglob(".*"):
        name = path.name
        if ".tmp" in name or name.startswith(".staging-"):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def check_checkpoint(root: Path, i: int) -> dict[str, Any]:
    from medseg.checkpoint import load_checkpoint, save_checkpoint

    best = root / "disk" / "run" / "best.pt"
    try:
        meta = load_checkpoint(best)["meta"]
        state = "previous" if meta == {"epoch": 1} else "new" if meta == {"epoch": 2, "try": i} else "other"
    except Exception as err:
        state = f"does not load: {type(err).__name__}: {err}"
    left = temp_leftovers(root / "disk")
    save_checkpoint(best, _model(0), {"epoch": 1})  # the next write
    return {"state": state, "ok": state in ("previous", "new"), "temp_left_by_kill": len(left),
            "temp_left_after_next_write": temp_leftovers(root / "disk")}


def check_cache(root: Path, reference: str) -> dict[str, Any]:
    from medseg.data.cache import build_cache, existing_cache
    from medseg.data.sources import open_source_from_config

    previous = previous_loads("cache", root)
    dataset = _dataset(root, 64)
    try:
        cache = existing_cache(dataset, open_source_from_config(dataset))
        state = "absent" if cache is None else "complete" if _tree_digest(cache.root) == reference else "torn"
    except Exception as err:
        state = f"does not load: {type(err).__name__}: {err}"
    left = temp_leftovers(root / "disk")
    rebuilt = build_cache(dataset, progress=False)
    return {"state": state, "previous_loads": previous, "temp_left_by_kill": len(left),
            "next_build_equal": _tree_digest(rebuilt.root) == reference,
            "temp_left_after_next_write": temp_leftovers(root / "disk"),
            "ok": previous and state in ("absent", "complete") and _tree_digest(rebuilt.root) == reference}


def _loads(path: Path) -> bool:
    from medseg.checkpoint import load_checkpoint

    try:
        load_checkpoint(path)
        return True
    except Exception as err:
        print(f"does not load: {path}: {err}", file=sys.stderr)
        return False


def champion_state(root: Path) -> dict[str, Any]:
    """What a reader sees: the alias's version and whether its checkpoint loads; the mirror's version and whether
    its checkpoint loads; pending versions, the journal."""
    from medseg.registry import JOURNAL, PENDING, current_champion, download_checkpoint

    client = _client(root)
    alias = current_champion(client, REGISTRY)
    with tempfile.TemporaryDirectory() as tmp:
        alias_loads = alias is not None and _loads(download_checkpoint(alias, f"sqlite:///{root / 'mlflow.db'}",
                                                                       Path(tmp)))
    mirror = root / "models" / "champion"
    metrics = json.loads((mirror / "metrics.json").read_text()) if (mirror / "metrics.json").exists() else {}
    pending = [mv.version for mv in client.search_model_versions(f"name='{REGISTRY}'")
               if mv.tags.get("promoted") == PENDING]
    return {"alias": alias.version if alias else None, "alias_loads": alias_loads,
            "mirror": metrics.get("version"), "mirror_loads": _loads(mirror / "checkpoint.pt"),
            "pending": pending, "journal": (root / "models" / JOURNAL).exists()}


def check_promotion(root: Path, i: int, run_id: str) -> dict[str, Any]:
    from filelock import FileLock

    from medseg.registry import reconcile_champion

    before = champion_state(root)
    with FileLock(str(root / "models" / ".champion.lock")):
        repaired = reconcile_champion(_client(root), root / "models")
    after = champion_state(root)
    link = os.readlink(root / "models" / "champion")
    agree = after["alias"] is not None and str(after["alias"]) == str(after["mirror"]) \
        and link == f"versions/{REGISTRY}-v{after['alias']}"
    client = _client(root)
    versions = [mv for mv in client.search_model_versions(f"name='{REGISTRY}'") if mv.run_id == run_id]
    outcome = ("promoted" if versions and str(after["alias"]) == str(versions[0].version)
               else "not registered" if not versions else "undone")
    left = temp_leftovers(root / "models")
    ok = (before["alias_loads"] and before["mirror_loads"] and agree and not after["pending"]
          and not after["journal"] and not left)
    return {"outcome": outcome, "repaired": repaired, "before": before, "after": after, "agree": agree,
            "temp_left_after_repair": left, "ok": ok}


# ------------------------------------------------------------------------------------------------ one kill


def start_child(kind: str, root: Path, job: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ENTRY), "child", json.dumps({"kind": kind, "root": str(root), **job})],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"child did not start: {line!r} {proc.stderr.read()[-2000:]}")


def timed_write(kind: str, root: Path, job: dict[str, Any]) -> float:
    """One uninterrupted child: seconds from ``ready`` to ``done``."""
    proc = start_child(kind, root, job)
    _wait_ready(proc)
    started = time.perf_counter()
    line = proc.stdout.readline()
    seconds = time.perf_counter() - started
    out, err = proc.communicate(timeout=120)
    if line.strip() != "done" or proc.returncode != 0:
        raise RuntimeError(f"{kind}: the uninterrupted write failed: {err[-2000:]}")
    return seconds


def killed_write(kind: str, root: Path, job: dict[str, Any], delay: float) -> bool:
    """Start the write, SIGKILL it ``delay`` s after ``ready``; whether it was still writing (no ``done`` yet)."""
    proc = start_child(kind, root, job)
    _wait_ready(proc)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return "done" not in out


def kill_kind(kind: str, base: Path, kills: int, seed: int = SEED) -> dict[str, Any]:
    """``kills`` kills mid-write of ``kind`` (at most 3 times as many tries), each followed by its check."""
    rng = random.Random(f"{seed}-{kind}")
    root = base / kind
    root.mkdir(parents=True)
    setup(kind, root)
    job = {"i": 1, **before_try(kind, root, 1)}
    seconds = timed_write(kind, root, job)
    reference = _tree_digest(new_cache_folder(root)) if kind == "cache" else None
    if kind == "checkpoint":
        check_checkpoint(root, 1)
    elif kind == "promotion":
        check_promotion(root, 1, job["run_id"])
    tries, results, reach = 0, [], 1.1 * seconds
    while sum(r["mid_write"] for r in results) < kills and tries < 3 * kills:
        tries += 1
        i = tries + 1
        job = {"i": i, **before_try(kind, root, i)}
        delay = rng.uniform(0, reach)
        mid_write = killed_write(kind, root, job, delay)
        if not mid_write:  # the write took less than this delay: the next kill comes before it
            reach = min(reach, delay)
        if kind == "checkpoint":
            check = check_checkpoint(root, i)
        elif kind == "cache":
            check = check_cache(root, reference)
        else:
            check = check_promotion(root, i, job["run_id"])
        results.append({"try": i, "delay_s": round(delay, 4), "mid_write": mid_write, **check})
        print(json.dumps({"kind": kind, **results[-1]}), flush=True)
    mid = [r for r in results if r["mid_write"]]
    states = [r.get("state") or r.get("outcome") for r in mid]
    return {"write_seconds": round(seconds, 4), "tries": tries, "kills_mid_write": len(mid),
            "kept": sum(r["ok"] for r in results), "broken": [r for r in results if not r["ok"]][:5],
            "states": {s: states.count(s) for s in sorted(set(states))},
            "temp_left_by_kills": sum(r.get("temp_left_by_kill", 0) for r in results),
            "temp_left_after_next_write": sum(len(r.get("temp_left_after_next_write", []))
                                              + len(r.get("temp_left_after_repair", [])) for r in results)}


def run(quick: bool, kills: int | None = None, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """The kills section: each kind killed ``kills`` times mid-write (20; ``quick``: 5)."""
    n = kills or (QUICK_KILLS if quick else KILLS)
    with tempfile.TemporaryDirectory(prefix="medseg-kills-") as tmp:
        by_kind = {kind: kill_kind(kind, Path(tmp), n) for kind in kinds}
    broken = sum(r["tries"] - r["kept"] for r in by_kind.values())
    return {"kills_per_kind": n, "seed": SEED,
            "kills_mid_write": sum(r["kills_mid_write"] for r in by_kind.values()),
            "tries": sum(r["tries"] for r in by_kind.values()),
            "kept": sum(r["kept"] for r in by_kind.values()), "broken": broken,
            "enough_kills": all(r["kills_mid_write"] >= n for r in by_kind.values()),
            "nothing_lost": broken == 0 and all(r["kills_mid_write"] >= n for r in by_kind.values()),
            "by_kind": by_kind, "tests": "tests/test_kills.py"}


# ----------------------------------------------------------------------------------------------------------- main


def _child(job: dict[str, Any]) -> None:
    kind, root = job["kind"], Path(job["root"])
    _warm(kind, root)
    print("ready", flush=True)
    write(kind, root, job)
    print("done", flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        _child(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=KILLS)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args()
    print(json.dumps(run(quick=False, kills=args.kills, kinds=tuple(args.kinds)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
