"""A full disk (issue 14, guarantee 6): a write that meets a full disk leaves the previous files as they were (they
still load, byte for byte), leaves no temp file, and is one ``error:`` line naming the file. Each write runs in a real
child process through run_cli, under a file size limit (``ulimit -f``: EFBIG, anywhere) and on a real full tmpfs
(ENOSPC; root only, in a private mount namespace), after the previous state was written
(``benchmarks/reliability_disk.py``)."""
from __future__ import annotations

import errno

import pytest

from benchmarks.reliability_disk import KINDS, tmpfs_unavailable, try_mode
from medseg.errors import MedsegError
from medseg.io_utils import DiskFullError, atomic_path, atomic_write_bytes, disk_full_error


@pytest.fixture(scope="module")
def file_size_limit() -> dict[str, dict]:
    return {r["kind"]: r for r in try_mode("file_size_limit")}


@pytest.fixture(scope="module")
def small_tmpfs() -> dict[str, dict]:
    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(f"no small tmpfs here: {reason}")
    return {r["kind"]: r for r in try_mode("small_tmpfs")}


def _params(marks: dict[tuple[str, str], pytest.MarkDecorator]):
    return [pytest.param(mode, kind, marks=marks.get((mode, kind), ()), id=f"{mode}-{kind}")
            for mode in ("file_size_limit", "small_tmpfs") for kind in KINDS]


@pytest.mark.parametrize("mode, kind", _params({}))
def test_previous_files_are_intact_and_no_temp_file_is_left(request, mode, kind):
    result = request.getfixturevalue(mode)[kind]
    assert result["returncode"] != 0  # the write did meet the full disk
    assert result["previous_intact"] and result["changed"] == []
    assert result["temp_files_left"] == []


@pytest.mark.parametrize("mode, kind", _params({}))
def test_the_error_is_one_line_naming_the_file(request, mode, kind):
    result = request.getfixturevalue(mode)[kind]
    assert result["one_line"] and not result["traceback"], result["message"]
    if kind.startswith("checkpoint"):
        reason = "File too large" if mode == "file_size_limit" else "No space left on device"
        assert result["message"].startswith("error: <tmp>/disk/run/best.pt: not written, ")
        assert f"({reason}); the previous best.pt is unchanged; " in result["message"]
    elif kind == "cache":
        assert ".img.npy: not written, " in result["message"] or ".lbl.npy: not written, " in result["message"]
        assert "the cache is not built and nothing of it is kept" in result["message"]
    else:
        assert "not written, " in result["message"] and "/champion) is unchanged" in result["message"]


def test_disk_full_error_is_a_medseg_error_and_an_oserror(tmp_path):
    """run_cli prints a MedsegError on one line; code that handled the OSError of a failed write still does."""
    (tmp_path / "old.json").write_text("{}")
    err = disk_full_error(tmp_path / "old.json", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, MedsegError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err) == (f"{tmp_path}/old.json: not written, the disk is full (No space left on device); the previous "
                        f"old.json is unchanged; free space in {tmp_path} and run again")
    assert "no partial file was left" in str(disk_full_error(tmp_path / "new.json", OSError(errno.EDQUOT, "quota")))


def test_other_write_errors_pass_unchanged_and_leave_no_temp_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(ValueError, match="not a disk error"):
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"new, half")
            raise ValueError("not a disk error")
    with pytest.raises(PermissionError) as caught:
        with atomic_path(tmp_path / "a.bin"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert not isinstance(caught.value, DiskFullError)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"old"
