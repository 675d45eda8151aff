"""Shared fixtures: small slices of the shipped task files, a tiny random encoder."""
from __future__ import annotations

import os

# Under pytest-xdist (the README's `-n 2`), one torch thread per worker and per process it starts: two workers on
# two cores, each on one thread, instead of each worker's torch spreading over both cores and fighting the other.
# Set before any test imports torch's thread pool into use; a process started by a test inherits the variables.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from minbert.tasks.data import TASKS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def write_slice(src: Path, dst: Path, rows: int) -> None:
    """Copy the header and the first ``rows`` records of a task file (byte-exact lines)."""
    with open(src, encoding="utf-8", newline="") as f:
        lines = f.readlines()
    dst.write_text("".join(lines[: rows + 1]), encoding="utf-8", newline="")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A data dir with 48 rows of every file (the two unlabeled quora-train rows are past these)."""
    d = tmp_path_factory.mktemp("data")
    for spec in TASKS.values():
        for name in spec.files.values():
            write_slice(DATA / name, d / name, 48)
    return d


@pytest.fixture
def data_copy(tmp_path, small_data) -> Path:
    """A private, writable copy of ``small_data`` for tests that corrupt files."""
    d = tmp_path / "data"
    shutil.copytree(small_data, d)
    return d


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster on a CPU shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of blocking the suite forever) when a read waits on a FIFO or another non-regular file."""
    def alarm(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s: a non-regular file was opened")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
