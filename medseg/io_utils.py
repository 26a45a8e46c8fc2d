"""Small file helpers: atomic writes (temp file in the same folder, fsync, rename), hashing, JSON.

A write that fails for space (a full disk, ``ENOSPC``; the file size limit of ``ulimit -f``, ``EFBIG``; a quota,
``EDQUOT``) inside ``atomic_path`` or ``disk_full_as_error`` is a ``DiskFullError``: one line naming the file, saying
that the previous file is unchanged (the temp file is removed, nothing was renamed over it) and what to do.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from medseg.errors import MedsegError, error_chain

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class DiskFullError(MedsegError, OSError):
    """A write that failed for space; the message names the file, what was kept and what to do. Also an OSError (its
    ``errno`` the original one), so code that handled the OSError of a failed write still does."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def disk_full_cause(err: BaseException | None) -> OSError | None:
    """The OSError with a disk-full errno (``DISK_FULL_ERRNOS``) in ``err`` or the errors it was raised from."""
    return next((e for e in error_chain(err) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS), None)


def disk_full_error(path: str | os.PathLike, cause: OSError, kept: str | None = None) -> DiskFullError:
    """The one-line error of ``path`` not written for space; ``kept`` says what stays (default: the previous file
    unchanged when there is one, else that no partial file was left)."""
    path = Path(path)
    if kept is None:
        kept = f"the previous {path.name} is unchanged" if path.exists() else "no partial file was left"
    what, todo = {
        errno.EFBIG: ("the file is over the size limit of this process (`ulimit -f`) or of its file system",
                      "raise the limit or write elsewhere, and run again"),
        errno.EDQUOT: ("the disk quota is used up", f"free space in {path.parent} (or raise the quota) and run again"),
    }.get(cause.errno, ("the disk is full", f"free space in {path.parent} and run again"))
    reason = cause.strerror or os.strerror(cause.errno)
    err = DiskFullError(f"{path}: not written, {what} ({reason}); {kept}; {todo}")
    err.errno, err.filename = cause.errno, str(path)
    return err


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike, kept: str | None = None) -> Iterator[None]:
    """Turn a write inside the block that fails for space (its OSError, or any error raised from one) into a
    ``DiskFullError`` naming ``path``; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise disk_full_error(path, cause, kept) from err


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # mkstemp/mkdtemp create 0600/0700; finished files get the usual permissions


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


def _writer_tag() -> str:
    return f"{os.getpid()}@{socket.gethostname().split('.')[0]}"


_WRITER = _writer_tag()
os.register_at_fork(after_in_child=lambda: globals().update(_WRITER=_writer_tag()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_writers_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files of ``atomic_path`` writes of ``path`` whose writer process (on this host) is gone: a
    SIGKILLed writer cannot remove its own. Temp files are never read (the rename is what publishes), so this is
    tidiness, not safety. Returns what was removed."""
    path = Path(path)
    host = socket.gethostname().split(".")[0]
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*@*.*.tmp*"):
        writer = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        pid, _, writer_host = writer.partition("@")
        if writer_host == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed over ``path``, on error removed. A write that
    fails for space (in the caller's block, the fsync or the rename) is a ``DiskFullError`` naming ``path``."""
    path = Path(path)
    with disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers_temp_files(path)
        # the temp name ends in ``suffix`` so writers that pick a format by extension (nibabel, PIL) still work; it
        # names its writer (pid@host) so that the next write can remove what a killed writer left
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_WRITER}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            publish_mode(tmp_path)
            os.replace(tmp_path, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-serialisable object with sorted keys (for settings and split hashes)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def json_safe(obj: Any) -> Any:
    """Strict-JSON copy: NaN and infinity to None (NaN marks an undefined metric, e.g. Dice of an empty-empty case,
    left out of the means), numpy scalars to Python, mapping keys to str, tuples to lists."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> str:
    """Aligned plain-text table: one header line, then one line per row; cells are str() of the values (format
    numbers before), columns two spaces apart, trailing spaces stripped."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def absolute_path(path: str, base: str | os.PathLike) -> str:
    """``path`` (``~`` expanded) resolved against ``base`` when relative; URIs (``scheme://``) unchanged."""
    if "://" in path:
        return path
    return str((Path(base) / os.path.expanduser(path)).resolve())
