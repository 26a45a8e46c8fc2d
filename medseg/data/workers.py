"""Worker processes for per-case jobs (the cache build): each worker handles one case at a time, so the memory of a
worker is the memory of one case, whatever the number of workers or cases.

``run_cases(job, case_ids, workers)`` yields ``(case_id, result)`` as workers finish them. Workers are spawned
(not forked: the parent may hold torch threads and open files), take one case id at a time from a queue and
record the case they work on in shared memory and report ``done`` (with the result and the worker's peak RSS) or
``error`` (the exception) for it.
A worker that dies (SIGKILL, out of memory) fails the job with one line naming the case it was working on;
Ctrl-C or an error in the parent stops every worker before the exception propagates.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import resource
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from medseg.errors import DataError

_POLL_S = 0.5  # how often the parent checks that its workers are alive while it waits for a result


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which taskset, cgroups and schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB: Linux's VmHWM (``ru_maxrss`` survives execve, so a spawned
    worker would report at least its parent's peak), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _worker(job: Callable[[str], Any], case_ids: Sequence[str], slot: int, current, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    try:
        import cv2

        cv2.setNumThreads(1)  # one core per worker: the workers are the parallelism
    except ImportError:
        pass
    while (index := tasks.get()) is not None:
        case_id = case_ids[index]
        current[slot] = index  # shared memory, written before the work starts: the parent can name the case we die on
        try:
            result = job(case_id)
        except Exception as err:  # noqa: BLE001 - sent to the parent, which raises it
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an exception that does not pickle still reaches the parent as text
                err = DataError(f"case {case_id}: {type(err).__name__}: {err}")
            results.put(("error", case_id, err))
            continue
        results.put(("done", case_id, (result, peak_rss_mb())))


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


def run_cases(job: Callable[[str], Any], case_ids: Sequence[str], workers: int) -> Iterator[tuple[str, Any, float]]:
    """Run ``job(case_id)`` for every case in ``workers`` spawned processes; yield ``(case_id, result, worker peak
    RSS MiB)`` in completion order. ``job`` must be picklable (a module-level function or a ``functools.partial``
    of one). An exception raised by ``job`` is re-raised here; a worker that dies raises ``DataError`` naming its
    case. The workers are always stopped before this generator finishes or raises."""
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    n = max(1, min(workers, len(case_ids)))
    current = ctx.Array("i", [-1] * n, lock=False)  # per worker: the index of the case it works on
    for index in range(len(case_ids)):
        tasks.put(index)
    for _ in range(n):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(job, list(case_ids), slot, current, tasks, results), daemon=True)
             for slot in range(n)]
    for p in procs:
        p.start()
    remaining = len(case_ids)
    try:
        while remaining:
            try:
                kind, case_id, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                _check_alive(procs, [case_ids[i] if i >= 0 else None for i in current])
                continue
            if kind == "error":
                raise payload
            remaining -= 1
            yield case_id, payload[0], payload[1]
    finally:
        _stop(procs)
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()


def _check_alive(procs, working: list[str | None]) -> None:
    for p, case in zip(procs, working):
        if p.exitcode is not None and p.exitcode != 0:
            what = f"case {case}" if case else "before its first case"
            err = DataError(f"{what}: cache worker {p.pid} died ({_exit_reason(p.exitcode)}); nothing was kept, "
                            "the cache is rebuilt from the start next time")
            err.case_id = case
            raise err


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
