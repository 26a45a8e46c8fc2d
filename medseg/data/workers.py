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


def _proc_mb(path: str, key: str) -> float | None:
    """A ``key: N kB`` line of a Linux /proc file in MiB; None where there is none (not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def available_memory_mb() -> float:
    """Memory available to new processes, MiB: Linux's MemAvailable; elsewhere unknown (infinity: no cap)."""
    available = _proc_mb("/proc/meminfo", "MemAvailable")
    return float("inf") if available is None else available


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB: Linux's VmHWM (``ru_maxrss`` survives execve, so a spawned
    worker would report at least its parent's peak), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    peak = _proc_mb("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _worker(job: Callable[[str], Any], case_ids: Sequence[str], slot: int, current, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    try:
        import cv2

        cv2.setNumThreads(1)  # one core per worker: the workers are the parallelism
    except ImportError:
        pass
    while (index := _next_task(tasks)) is not None:
        case_id = case_ids[index]
        current[slot] = index  # shared memory, written before the work starts: the parent can name the case we die on
        try:
            message = ("done", case_id, pickle.dumps((job(case_id), peak_rss_mb())))  # pickled here, not silently
        except Exception as err:  # noqa: BLE001 - sent to the parent, which raises it
            message = ("error", case_id, _portable(err, case_id))
        current[slot] = -1  # idle again: a death from here on is not this case's
        results.put(message)


def _next_task(tasks) -> int | None:
    """The next case index; None when the queue says stop or the parent is gone (SIGKILLed: nobody would read our
    results, and a worker must never outlive its build)."""
    parent = mp.parent_process()
    while parent is None or parent.is_alive():
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            continue
    return None


def _portable(err: Exception, case_id: str) -> Exception:
    """``err`` if it survives a pickle round trip (what the queue does), else a DataError with its text; either way
    naming its case (``case_id`` attribute, and a note on errors whose message may not name it)."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - an exception that does not travel still reaches the parent as text
        err = DataError(f"case {case_id}: {type(err).__name__}: {err}")
    err.case_id = case_id
    if not isinstance(err, DataError):
        err.add_note(f"(while preprocessing case {case_id} in a cache worker)")
    return err


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
    remaining, all_exited = len(case_ids), False
    try:
        _start(procs)
        while remaining:
            try:
                kind, case_id, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                if all_exited:  # a poll after they all left (their last results were already in the pipe)
                    raise WorkerDiedError(f"cache workers exited with {remaining} case(s) not reported; nothing "
                                          "was kept") from None
                all_exited = _check_alive(procs, [case_ids[i] if i >= 0 else None for i in current])
                continue
            if kind == "error":
                raise payload
            remaining -= 1
            yield case_id, *pickle.loads(payload)
    finally:
        _stop(procs)
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()


class WorkerDiedError(DataError, kind="cache_worker"):
    """A cache worker process died (killed, out of memory): the machine's fault, not the case's data."""


def _start(procs) -> None:
    """Start the workers with SIGINT ignored, so that they inherit it: a Ctrl-C while they import would otherwise
    print a traceback from each."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_alive(procs, working: list[str | None]) -> bool:
    """Raise for a worker that died; True when every worker has exited cleanly."""
    for p, case in zip(procs, working):
        if p.exitcode is not None and p.exitcode != 0:
            what = f"case {case}" if case else "between cases"
            err = WorkerDiedError(f"{what}: cache worker {p.pid} died ({_exit_reason(p.exitcode)}); nothing was "
                                  "kept, the cache is rebuilt from the start next time")
            err.case_id = case
            raise err
    return all(p.exitcode is not None for p in procs)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
