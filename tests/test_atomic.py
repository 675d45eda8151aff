"""Atomic writes (minbert/io/write.py): a process killed while writing leaves the previous file (or checkpoint
directory) intact; every writer in minbert goes through minbert.io."""
from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minbert.io import AppendLog, atomic_save, atomic_write_text, published_dir, remove_stale_temps, replace_dir

from .conftest import ROOT

# A child that saves a ~100 MB safetensors state over and over (each version filled with its number) with
# minbert/io/write.py, announcing each write before it starts and after it is published. It loads write.py by path with
# NumPy's safetensors writer, so it starts in a fraction of a second (no torch import).
WRITER = r"""
import importlib.util, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file

spec = importlib.util.spec_from_file_location("minbert_io", sys.argv[3])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
kind, target = sys.argv[1], Path(sys.argv[2])
big = np.empty(25_000_000, dtype=np.float32)
for i in range(1, 1000):
    big.fill(i)
    print("writing", i, flush=True)
    if kind == "file":
        io.atomic_save(target, lambda p: save_file({"x": big}, str(p)))
    else:  # a checkpoint directory of two files, swapped in whole
        def write(d):
            io.atomic_save(d / "model.safetensors", lambda p: save_file({"x": big[:15_000_000]}, str(p)))
            io.atomic_save(d / "optimizer.safetensors", lambda p: save_file({"x": big[:10_000_000]}, str(p)))
        io.replace_dir(target, write)
    print("done", i, flush=True)
"""


def kill_while_writing(kind: str, target: Path, rng: random.Random) -> tuple[int, bool]:
    """Start the writer, SIGKILL it a moment after it begins a write (the 2nd to 4th); return the number of
    the last version it published and whether a temporary file was left behind (the kill hit a write)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target), str(ROOT / "minbert" / "io" / "write.py")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_at = rng.randint(2, 4)
    done = 0
    try:
        for line in p.stdout:
            word, n = line.split()
            if word == "done":
                done = int(n)
            elif int(n) == kill_at:
                time.sleep(rng.uniform(0.0, 0.05))
                p.send_signal(signal.SIGKILL)
                break
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    leftovers = [e for e in target.parent.iterdir() if e.name.endswith((".tmp", ".partial"))]
    return done, bool(leftovers)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_sigkill_during_a_large_write_keeps_the_previous_version(tmp_path, kind):
    rng = random.Random(1234)
    target = tmp_path / ("last" if kind == "directory" else "model.safetensors")
    hit = 0
    for attempt in range(4):
        done, left = kill_while_writing(kind, target, rng)
        hit += left
        assert done >= 1  # at least one version was published before the kill
        names = ("model.safetensors", "optimizer.safetensors") if kind == "directory" else ("",)
        base = published_dir(target) if kind == "directory" else target
        values = {float(x) for n in names for x in np.unique(load_file(str(base / n) if n else str(base))["x"])}
        # One whole version: the last published one, or the one being published when the kill came.
        assert len(values) == 1 and values.pop() in (done, done + 1)
        remove_stale_temps(tmp_path)
        assert not [e for e in tmp_path.iterdir() if e.name.endswith((".tmp", ".partial"))]
    assert hit >= 1, "no kill landed inside a write; the test did not test anything"


def test_failed_write_keeps_previous_file_and_removes_temp(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old\n")

    def broken(path: Path) -> None:
        path.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(target, broken)
    assert target.read_text() == "old\n"
    assert [e.name for e in tmp_path.iterdir()] == ["results.json"]


def test_replace_dir_killed_between_the_two_renames_falls_back_to_old(tmp_path, monkeypatch):
    target = tmp_path / "last"
    replace_dir(target, lambda d: atomic_write_text(d / "step.txt", "1"))
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(src).is_dir() or Path(dst).is_dir():
            calls.append((Path(src).name, Path(dst).name))
            raise KeyboardInterrupt  # after last -> last.old, before last.partial -> last

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, lambda d: atomic_write_text(d / "step.txt", "2"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls == [("last", "last.old")]
    assert not target.exists() and (published_dir(target) / "step.txt").read_text() == "1"
    replace_dir(target, lambda d: atomic_write_text(d / "step.txt", "3"))  # the next save recovers
    assert published_dir(target) == target and (target / "step.txt").read_text() == "3"
    assert sorted(e.name for e in tmp_path.iterdir()) == ["last"]


def test_append_log_drops_a_torn_last_line_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = AppendLog(path)
    log.write_line('{"step": 1}')
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"step": 2, "loss')  # a writer killed in mid-record
    log = AppendLog(path)
    log.write_line('{"step": 2}')
    log.close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(ValueError, match="one line"):
        AppendLog(path).write_line("a\nb")


# ---------------------------------------------------------------------------------------------------------
# Audit: every file minbert writes goes through minbert/io/write.py.

# Calls that write a file themselves (model.save and config.save call the minbert.io helpers).
RAW_WRITERS = {"torch.save", "save_file", "np.save", "numpy.save"}
RAW_WRITER_METHODS = {"write_text", "write_bytes", "savefig"}
# embedded.py writes the extracted model into a private temporary directory that is published by one rename.
ALLOWED = {("embedded.py", "open")}


def _non_atomic_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def inside_atomic(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.Lambda) or isinstance(node, ast.FunctionDef) and node.name == "write":
                return True  # a callback handed to atomic_save / replace_dir
            if isinstance(node, ast.With) and any("atomic" in ast.unparse(item.context_expr) for item in node.items):
                return True
        return False

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        name = func.rsplit(".", 1)[-1]
        if name == "open":
            modes = node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
            writes = any(isinstance(m, ast.Constant) and set(str(m.value)) & set("wax+") for m in modes)
        else:
            writes = func in RAW_WRITERS or (isinstance(node.func, ast.Attribute) and name in RAW_WRITER_METHODS)
        if writes and not inside_atomic(node) and (path.name, name) not in ALLOWED:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_writer_goes_through_io_module():
    files = [p for p in (ROOT / "minbert").rglob("*.py") if p != ROOT / "minbert" / "io" / "write.py"]
    offenders = [f for p in files for f in _non_atomic_writes(p)]
    assert not offenders, "write these through minbert/io (write.py):\n" + "\n".join(offenders)


def test_audit_flags_plain_writes(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\n"
        "from minbert.io import atomic_save\n"
        "open('a', 'w').write('x')\n"
        "open('b', mode='ab')\n"
        "open('c').read()\n"
        "path.write_text('x')\n"
        "torch.save(state, 'x.pt')\n"
        "atomic_save('y.pt', lambda p: torch.save(state, p))\n"
        "with atomic_path('z.png') as tmp:\n"
        "    fig.savefig(tmp)\n"
    )
    assert sorted(int(f.split(":")[1]) for f in _non_atomic_writes(sample)) == [3, 4, 6, 7]
