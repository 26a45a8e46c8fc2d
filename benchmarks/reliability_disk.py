#!/usr/bin/env python
"""A full disk (issue 14, guarantee 6): a disk that fills up while medseg writes a checkpoint (``save_checkpoint``,
``update_checkpoint_meta``), the slice cache (``build_cache``) or the champion mirror (``mirror_champion``) must leave
the previous files as they were (they still load, byte for byte), leave no temp file behind, and say so in one line
naming the file.

Each write runs in a child process through ``medseg.cli.run_cli`` (so its stderr is what a user sees) after the
previous state was written, in one of two modes:

- ``file_size_limit``: the child sets ``RLIMIT_FSIZE`` (``ulimit -f``, 16 KiB) with SIGXFSZ ignored, so a write past
  the limit fails with ``EFBIG`` (what ``ENOSPC`` does on a full disk). Works anywhere, for any user.
- ``small_tmpfs``: a real full file system. A 4 MiB tmpfs is mounted in a private mount namespace (``unshare -m``,
  root only; skipped elsewhere), the previous state written on it, the rest filled with a ballast file but 16 KiB;
  writes fail with ``ENOSPC`` (and writes through a memory map of a sparse file get SIGBUS).

``run(quick)`` is the full_disk section of benchmarks/bench_reliability.py (every write in both modes; ~50 s on 2 busy
cores).

  python benchmarks/reliability_disk.py          (prints the section)

Tested by tests/test_full_disk.py.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from benchmarks.reliability_concurrency import child_env, tiny_config

KINDS = ("checkpoint", "checkpoint_meta", "cache", "champion_mirror")
MODES = ("file_size_limit", "small_tmpfs")
ROOM = 16 * 1024  # the writer's file size limit, or the room left on the filled tmpfs
TMPFS_SIZE = "4m"
BALLAST = ".ballast"
ENTRY = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------- previous state, write


def _model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(128, 128)  # a 66 KB checkpoint: far over the room a write gets


def _config_dict(root: Path, image_size: int = 64) -> dict[str, Any]:
    cfg = tiny_config(root / "data", root / "disk" / "cache", root)
    cfg["dataset"]["image_size"] = image_size
    return cfg


def _config(root: Path):
    from medseg.config import config_from_dict

    return config_from_dict(_config_dict(root), source="full-disk")


def _dataset(root: Path, image_size: int):
    """The dataset section alone: a whole Config validates the model against segmentation-models-pytorch (4 s of
    imports in each child)."""
    from medseg.config import DatasetConfig

    return DatasetConfig.model_validate(_config_dict(root, image_size)["dataset"])


def _decision(version: int, run_id: str):
    from medseg.registry import Decision

    candidate = {"run_id": run_id, "dice": 0.5 + version / 100, "iou": 0.4, "dice_micro": 0.5, "lesion_recall": None,
                 "lesion_precision": None, "n_cases": 2, "n_scored": 2, "split_hash": "full-disk"}
    return Decision(promoted=True, alias="champion", reason=f"promoted: version {version}", registry_name="tiny",
                    version=str(version), candidate=candidate)


def setup(kind: str, root: Path) -> None:
    """The previous state of ``kind`` under ``root/disk`` (and its inputs beside it)."""
    disk = root / "disk"
    if kind in ("checkpoint", "checkpoint_meta"):
        from medseg.checkpoint import save_checkpoint

        save_checkpoint(disk / "run" / "best.pt", _model(0), {"epoch": 1})
    elif kind == "cache":
        from medseg.data.cache import build_cache
        from medseg.data.synthetic import generate_task

        generate_task(root / "data", cases=4, size=64, slices=(6, 8), seed=0)
        build_cache(_dataset(root, 32), progress=False)
    elif kind == "champion_mirror":
        from medseg.checkpoint import save_checkpoint
        from medseg.registry import mirror_champion

        cfg = _config(root)
        for seed in (0, 1):
            save_checkpoint(root / f"candidate{seed}.pt", _model(seed), {"epoch": seed + 1})
        mirror_champion(disk / "models", root / "candidate0.pt", cfg, _decision(1, "run0"))
    else:
        raise ValueError(kind)


def write(kind: str, root: Path) -> None:
    """The write that meets the full disk (in the child)."""
    disk = root / "disk"
    if kind == "checkpoint":
        from medseg.checkpoint import save_checkpoint

        save_checkpoint(disk / "run" / "best.pt", _model(1), {"epoch": 2})
    elif kind == "checkpoint_meta":
        from medseg.checkpoint import update_checkpoint_meta

        update_checkpoint_meta(disk / "run" / "best.pt", {"note": "written on a full disk"})
    elif kind == "cache":
        from medseg.data.cache import build_cache

        build_cache(_dataset(root, 64), progress=False)
    elif kind == "champion_mirror":
        from medseg.registry import mirror_champion

        mirror_champion(disk / "models", root / "candidate1.pt", _config(root), _decision(2, "run1"))
    else:
        raise ValueError(kind)


def previous_loads(kind: str, root: Path) -> bool:
    """Whether the previous state still loads as what it was (epoch 1, the 32 px cache, champion version 1)."""
    disk = root / "disk"
    try:
        if kind in ("checkpoint", "checkpoint_meta"):
            from medseg.checkpoint import load_checkpoint

            return load_checkpoint(disk / "run" / "best.pt")["meta"] == {"epoch": 1}
        if kind == "cache":
            from medseg.data.cache import existing_cache
            from medseg.data.sources import open_source_from_config

            dataset = _dataset(root, 32)
            cache = existing_cache(dataset, open_source_from_config(dataset))
            return cache is not None and all(cache.image(c).shape[1:] == (32, 32) for c in cache.case_ids)
        if kind == "champion_mirror":
            from medseg.checkpoint import load_checkpoint

            champion = disk / "models" / "champion"
            metrics = json.loads((champion / "metrics.json").read_text())
            return (os.readlink(champion) == "versions/tiny-v1" and metrics["version"] == "1"
                    and load_checkpoint(champion / "checkpoint.pt")["meta"] == {"epoch": 1})
    except Exception as err:  # any failure to load is the answer
        print(f"{kind}: previous state does not load: {type(err).__name__}: {err}", file=sys.stderr)
        return False
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------ one try, checks


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of each file, ``link:<target>`` of each symlink, ``dir`` of each folder, without
    following links; the ballast and lock files (which a build leaves on purpose) left out."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if name == BALLAST or name.endswith(".lock"):
                continue
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fill(disk: Path, room: int = ROOM) -> int:
    """Fill the file system of ``disk`` with a ballast file, then free ``room`` bytes of it; the bytes left free."""
    ballast = disk / BALLAST
    with open(ballast, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush (and fail) at close
        chunk = b"\0" * 65536
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
    with open(ballast, "rb+") as fh:  # what did fit; then give ``room`` back
        size = os.fstat(fh.fileno()).st_size
        fh.truncate(max(0, size - room))
    return shutil.disk_usage(disk).free


def start_writer(kind: str, root: Path, limit: int | None) -> subprocess.Popen:
    """``write(kind)`` in a child through run_cli, under the file size limit ``limit`` (None: none)."""
    job = json.dumps({"kind": kind, "root": str(root), "limit": limit})
    return subprocess.Popen([sys.executable, str(ENTRY), "write", job], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env(), cwd=root)


def one_line_naming(stderr: str, returncode: int, disk: Path) -> bool:
    """What a user must see: exit 1 and one ``error:`` line naming a file on the full disk, no traceback."""
    lines = stderr.strip().splitlines()
    return returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and str(disk) in lines[0]


def try_writes(kinds: tuple[str, ...], base: Path, mode: str) -> list[dict[str, Any]]:
    """For each kind in ``base/<mode>-<kind>``: the previous state, (the tmpfs filled,) then all the writes at once,
    each in its child, then the checks. In ``small_tmpfs`` mode each ``<root>/disk`` must be a tmpfs already."""
    roots, before, free = {k: base / f"{mode}-{k}" for k in kinds}, {}, {}
    for kind, root in roots.items():
        (root / "disk").mkdir(parents=True, exist_ok=True)
        setup(kind, root)
        free[kind] = fill(root / "disk") if mode == "small_tmpfs" else None
        before[kind] = snapshot(root / "disk")
    children = {kind: start_writer(kind, root, ROOM if mode == "file_size_limit" else None)
                for kind, root in roots.items()}
    results = []
    for kind, root in roots.items():
        try:
            _, stderr = children[kind].communicate(timeout=300)
        except subprocess.TimeoutExpired:
            children[kind].kill()
            _, stderr = children[kind].communicate()
        returncode, after = children[kind].returncode, snapshot(root / "disk")
        changed = sorted(k for k, v in before[kind].items() if after.get(k) != v)
        message = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        results.append({"kind": kind, "mode": mode, "returncode": returncode,
                        "previous_intact": not changed and previous_loads(kind, root), "changed": changed,
                        "temp_files_left": sorted(set(after) - set(before[kind])),
                        "one_line": one_line_naming(stderr, returncode, root / "disk"),
                        "message": message.replace(str(root), "<tmp>")[:400], "free_bytes_at_write": free[kind],
                        "traceback": "Traceback" in stderr})
    return results


# ---------------------------------------------------------------------------------------------------------- modes


@functools.cache
def tmpfs_unavailable() -> str | None:
    """Why a small tmpfs cannot be mounted here (None: it can): root, ``unshare`` and ``mount -t tmpfs`` in a private
    mount namespace are needed."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "no unshare or mount command"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs -o size=64k tmpfs {tmp} && touch {tmp}/x"],
                               capture_output=True, text=True)
    return None if probe.returncode == 0 else f"mount -t tmpfs refused: {probe.stderr.strip()[:200]}"


def try_in_tmpfs(kinds: tuple[str, ...], base: Path) -> list[dict[str, Any]]:
    """``try_writes`` with each kind on its own small tmpfs, in one private mount namespace (the mounts are gone with
    its process, whatever happens)."""
    job = json.dumps({"kinds": list(kinds), "base": str(base)})
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(ENTRY), "tmpfs", job],
                          capture_output=True, text=True, env=child_env(), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"tmpfs scenarios failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tmpfs_scenarios(job: dict) -> list[dict[str, Any]]:
    """In the private mount namespace: a tmpfs for each kind, the writes, the checks."""
    base, kinds = Path(job["base"]), tuple(job["kinds"])
    for kind in kinds:
        disk = base / f"small_tmpfs-{kind}" / "disk"
        disk.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(disk)], check=True)
    return try_writes(kinds, base, "small_tmpfs")


def try_mode(mode: str, kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
    """Every kind in ``mode``, in a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="medseg-full-disk-") as tmp:
        if mode == "small_tmpfs":
            return try_in_tmpfs(kinds, Path(tmp))
        return try_writes(kinds, Path(tmp), mode)


def run(quick: bool) -> dict[str, Any]:
    """The full_disk section: every write in each mode available here (``quick`` is accepted for the interface;
    every case is cheap)."""
    modes = [m for m in MODES if m != "small_tmpfs" or tmpfs_unavailable() is None]
    results = [r for mode in modes for r in try_mode(mode)]
    for result in results:
        print(json.dumps(result), flush=True)
    failed = [r for r in results if not (r["previous_intact"] and not r["temp_files_left"] and r["one_line"])]
    return {"writes_tried": len(results), "modes": modes,
            "modes_skipped": {} if "small_tmpfs" in modes else {"small_tmpfs": tmpfs_unavailable()},
            "previous_intact": sum(r["previous_intact"] for r in results),
            "one_line_errors": sum(r["one_line"] for r in results),
            "temp_files_left": sum(len(r["temp_files_left"]) for r in results),
            "tracebacks": sum(r["traceback"] for r in results),
            "not_kept": [f"{r['mode']}/{r['kind']}" for r in failed],
            "nothing_lost": not failed, "results": results, "tests": "tests/test_full_disk.py"}


# ----------------------------------------------------------------------------------------------------------- main


def _write_child(job: dict) -> None:
    from medseg.cli import run_cli

    kind, root, limit = job["kind"], Path(job["root"]), job["limit"]
    call: Callable[[], None] = functools.partial(write, kind, root)
    # the imports of the write first (so that a limit does not meet a .pyc or a lazy import), then the limit
    if kind == "cache":
        import medseg.data.cache  # noqa: F401
        import medseg.data.sources  # noqa: F401
    else:
        import medseg.checkpoint  # noqa: F401
        import medseg.registry  # noqa: F401
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    run_cli(call)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        _write_child(json.loads(sys.argv[2]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "tmpfs":
        print(json.dumps(_tmpfs_scenarios(json.loads(sys.argv[2]))))
        return 0
    print(json.dumps(run(quick=False), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
