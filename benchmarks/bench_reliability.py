#!/usr/bin/env python
"""Reliability figures of issue 14: one section per guarantee, each a function ``(quick) -> dict`` of counts whose
``nothing_lost`` says whether the guarantee held on every case tried (docs/reliability.md maps them to the tests).

- fuzzed_loaders (guarantee 5): the properties of tests/test_fuzz.py (configs, --set overrides, search spaces,
  evalseg pickles: random, mutated and hostile bytes) with more examples: every outcome counted, none raised.
- hostile_archives (guarantee 4): ``benchmarks/reliability_hostile.py``'s ``run(quick)``, when that module exists.
- concurrent_tracking (guarantee 2): ``benchmarks/reliability_concurrency.py``: rounds of 4 train.py processes
  released together on a fresh sqlite store; runs, metrics expected / present, runs left RUNNING, lock errors.
- full_disk (guarantee 6): ``benchmarks/reliability_disk.py``: a checkpoint, a metadata update, the slice cache and
  the champion mirror written on a full disk (a file size limit, and a small tmpfs where it can be mounted);
  previous files intact, one-line errors, temp files left.
- tracking_server (guarantee 3): ``benchmarks/reliability_server.py``: train.py tracked into a real ``mlflow server``
  (plain; the server SIGKILLed after the first epoch and restarted on the same port and store; killed for good):
  runs FINISHED, metrics expected / present on the server, checkpoint artifacts there, one-line errors, tracebacks.
- kills (guarantee 1): ``benchmarks/reliability_kills.py``: a best checkpoint write, a cache build and a champion
  promotion each SIGKILLed at seeded random points (20 kills mid-write each): previous state loads, nothing torn picked
  up, alias and mirror agree after the next decision's repair, temp files removed by the next write.
- determinism (guarantee 7): ``benchmarks/reliability_determinism.py``: train.py twice (split, cache, per-epoch
  metrics, weights compared to the bit) and a study three times (twice through, once Ctrl-C'd and resumed): values
  compared and differing, same champion.

  python benchmarks/bench_reliability.py [--quick] [--examples N] [--sections NAME ...]

Writes benchmarks/results/reliability.json; with --sections, only those sections are run and replaced in it (the
others kept as they were).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import sys
import time
from typing import Callable

from benchmarks import common

EXAMPLES, QUICK_EXAMPLES = 2000, 200  # per fuzzed property
OPTIONAL_SECTIONS = {  # section -> module with run(quick)
    "hostile_archives": "benchmarks.reliability_hostile",
    "concurrent_tracking": "benchmarks.reliability_concurrency",
    "full_disk": "benchmarks.reliability_disk",
    "tracking_server": "benchmarks.reliability_server",
    "kills": "benchmarks.reliability_kills",
    "determinism": "benchmarks.reliability_determinism",
}
RUN_KEYS = ("quick", "machine", "load_average_before", "load_average_after", "total_seconds", "date")


def fuzz_properties():
    """tests/test_fuzz.py, loaded from its file (the tests folder is not an installed package)."""
    path = common.REPO / "tests" / "test_fuzz.py"
    spec = importlib.util.spec_from_file_location("medseg_fuzz_properties", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fuzzed_loaders(quick: bool, examples: int | None = None) -> dict:
    """Each property driven by hypothesis with ``examples`` examples; outcomes counted per loader."""
    fuzz = fuzz_properties()
    n = examples or (QUICK_EXAMPLES if quick else EXAMPLES)
    names = list(fuzz.properties())
    by_loader = {}
    for name in names:
        outcomes: collections.Counter = collections.Counter()
        fuzz.run_property(name, n, lambda result, c=outcomes: c.update([result]))
        other = {k: v for k, v in outcomes.items() if k not in (fuzz.VALID, fuzz.REFUSED, "code_run")}
        by_loader[name] = {"examples": sum(outcomes.values()), "valid": outcomes[fuzz.VALID],
                           "refused_one_line": outcomes[fuzz.REFUSED], "other_exceptions": sum(other.values()),
                           "code_run": outcomes["code_run"], "escaped": dict(sorted(other.items())[:10])}
        print(f"{name}: {by_loader[name]}", flush=True)
    totals = {key: sum(r[key] for r in by_loader.values())
              for key in ("examples", "valid", "refused_one_line", "other_exceptions", "code_run")}
    skipped = [] if fuzz.EVALSEG_DIR.is_dir() else [f"evalseg pickles: {fuzz.EVALSEG_DIR} not found"]
    return {**totals, "examples_per_property": n, "nothing_lost": totals["other_exceptions"] + totals["code_run"] == 0,
            "by_loader": by_loader, "skipped": skipped, "tests": "tests/test_fuzz.py"}


def sections() -> dict[str, Callable[[bool], dict]]:
    """Guarantee section -> its figures; the optional modules' ``run`` when they are there."""
    out: dict[str, Callable[[bool], dict]] = {"fuzzed_loaders": fuzzed_loaders}
    for name, module in OPTIONAL_SECTIONS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = importlib.import_module(module).run
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"fewer cases ({QUICK_EXAMPLES} examples a property)")
    parser.add_argument("--examples", type=int, help=f"examples per fuzzed property (default {EXAMPLES})")
    parser.add_argument("--sections", nargs="+", metavar="NAME", choices=sorted(sections()),
                        help="run only these sections; the other sections of the results file are kept")
    common.add_out_arg(parser, "reliability.json")
    args = parser.parse_args(argv)
    out = common.out_path(args, "reliability")
    clock = common.RunClock()
    # --sections: the other sections stay as they were measured, and so do the run keys that describe that run
    previous = json.loads(out.read_text()) if args.sections and out.exists() else {}
    report = {k: v for k, v in previous.items() if k not in ("summary", *RUN_KEYS)}
    for name, run in sections().items():
        if args.sections and name not in args.sections:
            continue
        started = time.perf_counter()
        report[name] = fuzzed_loaders(args.quick, args.examples) if run is fuzzed_loaders else run(args.quick)
        if args.sections:  # this section's own run: how, how long, when
            report[name]["measured"] = {"quick": args.quick, "seconds": round(time.perf_counter() - started, 1),
                                        "load_average_after": os.getloadavg(),
                                        "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["summary"] = {name: figures.get("nothing_lost") for name, figures in report.items()}
    run_keys = {k: previous[k] for k in RUN_KEYS if k in previous}
    report.update(run_keys or dict(quick=args.quick,
                                   machine=common.machine_info(("hypothesis", "pydantic", "PyYAML", "numpy")),
                                   **clock.record()))
    common.write_results(out, report)
    return 0 if all(report["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
