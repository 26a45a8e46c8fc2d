"""The exit codes every entry point shares (``medseg.cli``): one real command per code, run as the user runs it.

0 done, 1 a failed job (and the audit's verdict on hard data errors), 2 a bad command line or config, 130 / 143
Ctrl-C / SIGTERM. The cheapest commands that reach each code are used; train.py's own 143 is in test_tracking.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medseg import cli
from medseg.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MedsegError,
    NonFiniteLossError,
    RunInterrupted,
    ShapeMismatchError,
    UsageError,
)
from tests.fixtures import SPACING, interruptible, make_kaggle_task, tiny_case

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["train.py", "eval.py", "infer.py", "tune.py", "medseg/data/__main__.py",
                "medseg/data/synthetic/__main__.py", "medseg/report.py", "medseg/export.py"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a refused command (no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_every_entry_point_runs_through_run_cli():
    for name in ENTRY_POINTS:
        assert "run_cli(main)" in (REPO / name).read_text(), name


def test_exit_code_of_each_error():
    assert cli.exit_code(ConfigError("x")) == cli.exit_code(UsageError("x")) == cli.EXIT_USAGE == 2
    for err in (MedsegError("x"), DataError("x"), ShapeMismatchError("x"), CheckpointError("x"),
                NonFiniteLossError("x")):
        assert cli.exit_code(err) == cli.EXIT_FAILED == cli.EXIT_DATA_ERRORS == 1, err
    assert cli.exit_code(KeyboardInterrupt()) == cli.exit_code(RunInterrupted("x")) == cli.EXIT_INTERRUPTED == 130
    assert cli.exit_code(cli.Terminated()) == cli.EXIT_TERMINATED == 143


def test_done_is_0(tmp_path):
    from medseg.data.evalseg_pickle import write_label_pickle

    path = write_label_pickle(tmp_path / "001.pkl", np.ones((2, 2, 2), np.uint8), SPACING)
    proc = run("-m", "medseg.data", "inspect", str(path), cwd=tmp_path)
    assert proc.returncode == 0 and str(path) in proc.stdout, proc.stderr


def test_a_bad_command_line_is_2(tmp_path):
    proc = run("-m", "medseg.data", "check", cwd=tmp_path)
    assert proc.returncode == 2 and "the following arguments are required: --config" in proc.stderr, proc.stderr


def test_a_bad_config_is_2_on_one_line(tmp_path):
    proc = run("-m", "medseg.data", "check", "--config", str(tmp_path / "nowhere.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert error_line(proc) == f"error: {tmp_path / 'nowhere.yaml'}: cannot read (No such file or directory)"


def test_a_failed_job_is_1_on_one_line(tmp_path):
    proc = run(str(REPO / "infer.py"), "--ckpt", str(tmp_path / "nowhere.pt"), "--input", str(tmp_path), "--out",
               str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 1
    assert error_line(proc) == f"error: {tmp_path / 'nowhere.pt'}: checkpoint not found"


def test_the_audits_verdict_on_hard_data_errors_is_1_with_its_report(tmp_path):
    make_kaggle_task(tmp_path / "data", {"001": tiny_case(0), "002": tiny_case(1)}, gt_only={"003": tiny_case(2)[1]})
    config = tmp_path / "config.yaml"
    config.write_text(f"dataset: {{path: {tmp_path / 'data'}, cache_dir: {tmp_path / 'cache'}}}\n"
                      f"output: {{run_dir: {tmp_path / 'runs'}}}\n")
    proc = run("-m", "medseg.data", "check", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == cli.EXIT_DATA_ERRORS == 1, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    assert summary["exit_code"] == 1 and summary["errors_by_kind"] == {"unpaired": 1}
    assert "error: " not in proc.stderr and "Traceback" not in proc.stderr  # a verdict, not a failure


def _reading_a_fifo_config(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """``python -m medseg.data check`` blocked reading its config from a FIFO (a real command, waiting in main);
    returns it and the FIFO's write end, kept open so that the read waits."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "medseg.data", "check", "--config", str(fifo)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while True:  # a FIFO's write end opens once a reader has it open
        try:
            return proc, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO or proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("signum, code, last_line", [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_is_130_and_sigterm_143(tmp_path, signum, code, last_line):
    proc, writer = _reading_a_fifo_config(tmp_path)
    try:
        proc.send_signal(signum)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # CPython runs a signal's Python handler between bytecodes: a signal that lands after the FIFO opened but
            # before read() blocked is pending until read returns. End of file returns it (the handler then raises).
            os.close(writer)
            writer = None
            _, err = proc.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
    assert proc.returncode == code and err.strip().splitlines()[-1] == last_line, err
