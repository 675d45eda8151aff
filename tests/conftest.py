"""Shared fixtures: small slices of the shipped task files, a tiny random encoder."""
from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from minbert.data import TASKS

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
