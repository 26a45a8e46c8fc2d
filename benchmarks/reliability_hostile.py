#!/usr/bin/env python
"""Hostile archives and headers (issue 14, guarantee 4): each input of ``tests.fixtures.HOSTILE`` (zip member names
with ``../`` or ``/``, zip and gzip bombs, an encrypted member, NIfTI headers declaring more voxels than the file
holds, NaN/Inf voxels, zero slices, PNG decompression bombs) is built in a temporary folder and read through the
project's readers (``tests.fixtures.read_dataset``: every case's header shape, then the case) in a fresh interpreter
whose peak resident memory (VmHWM) is recorded. ``run(quick)`` is the hostile_archives section of
benchmarks/bench_reliability.py; every input is tried either way (~15 s), ``quick`` is accepted for its interface.

  python benchmarks/reliability_hostile.py          (prints the section)

Tested by tests/test_hostile_inputs.py (same inputs, same reads, each expected message).
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from benchmarks.common import REPO, child_job, print_child_result, run_child


def fixtures():
    """tests/fixtures.py, loaded from its file (the tests folder is not an installed package)."""
    spec = importlib.util.spec_from_file_location("medseg_test_fixtures", REPO / "tests" / "fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(job: dict) -> dict:
    """Read one hostile dataset in this fresh process: ``read_dataset``'s outcome and the peak RSS in MiB."""
    fx = fixtures()
    return {**fx.read_dataset(Path(job["dataset"])), "peak_rss_mb": round(fx.peak_rss_mb(), 1)}


def refused_on_one_line(result: dict, dataset: Path) -> bool:
    """A MedsegError whose message is one line starting with the dataset's path (and so naming the file at fault)."""
    message = result.get("message", "")
    return result["outcome"] == "refused" and "\n" not in message and message.startswith(str(dataset))


def try_input(name: str) -> tuple[dict, bool]:
    """(child result, whether anything under the temporary folder changed while reading) for one hostile input."""
    fx = fixtures()
    with tempfile.TemporaryDirectory(prefix="medseg-hostile-") as tmp:
        root = Path(tmp)
        dataset = fx.HOSTILE[name](root / "data")
        before = fx.snapshot(root)
        result = run_child(__file__, {"dataset": str(dataset)}, what=f"hostile input {name}").result
        result["one_line"] = refused_on_one_line(result, dataset)
        result["message"] = result.get("message", "").replace(str(root), "<tmp>")
        return result, fx.snapshot(root) != before


def run(quick: bool) -> dict:
    """Figures of every hostile input: how many were refused on one line naming the file, the others' outcomes,
    how many wrote anything beside the dataset, and each read's peak RSS."""
    results, written = {}, []
    for name in sorted(fixtures().HOSTILE):
        results[name], changed = try_input(name)
        if changed:
            written.append(name)
        print(f"{name}: {results[name]}", flush=True)
    others = [{"input": name, **r} for name, r in results.items() if not r["one_line"]]
    return {"inputs_tried": len(results), "refused_or_handled_one_line": len(results) - len(others),
            "other_outcomes": others, "written_outside": len(written), "written_by": written,
            "peak_rss_mb": {name: r["peak_rss_mb"] for name, r in results.items()},
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
            "messages": {name: r.get("message") for name, r in results.items()},
            "nothing_lost": not others and not written, "tests": "tests/test_hostile_inputs.py"}


def main() -> int:
    job = child_job()
    if job is not None:
        return print_child_result(child(job))
    print(json.dumps(run(quick=False), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
