"""Where minbert-predict --output and minbert-export --out may write (minbert.io.output_policy), and a full disk
(minbert.io.disk_full): refusals are one line, nothing is overwritten that the user did not ask for, nothing partial
is left behind."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from minbert.export import main as export_main
from minbert.io import atomic_write_text, build_dir
from minbert.io.disk_full import DiskFullError, disk_full, no_space_guard
from minbert.io.output_policy import LOCK_FILE, check_output_path
from minbert.predict_cli import main as predict_main

from .conftest import ROOT
from .test_api import tiny_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory, seed=3)


def predict(argv, capsys):
    code = predict_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_predict_output_refuses_existing_files_unless_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("mine\n")
    base = ["--checkpoint", str(run_dir), "--task", "sst", "a fine film", "--format", "csv", "--output", str(out)]
    code, _, err = predict(base, capsys)
    assert code == 1 and err == f"error: --output {out}: exists; pass --overwrite to replace it\n"
    assert out.read_text() == "mine\n"
    code, _, err = predict(base + ["--overwrite"], capsys)
    assert code == 0 and err == "" and out.read_text().startswith("id,sentence,label")
    assert sorted(os.listdir(tmp_path)) == ["preds.csv"]  # atomic: no temporary file left


@pytest.mark.parametrize("where", ["input", "weights", "inside run", "link to weights", "in predictions"])
def test_predict_output_never_writes_over_an_input_or_into_a_run(run_dir, tmp_path, capsys, where):
    inp = tmp_path / "in.txt"
    inp.write_text("a fine film\n")
    (tmp_path / "link").symlink_to(run_dir / "best" / "model.safetensors")
    target = {"input": inp, "weights": run_dir / "best" / "model.safetensors", "inside run": run_dir / "notes.csv",
              "link to weights": tmp_path / "link", "in predictions": run_dir / "predictions" / "x.csv"}[where]
    before = snapshot(run_dir), inp.read_bytes()
    code, out, err = predict(["--checkpoint", str(run_dir), "--task", "sst", "--input", str(inp), "--output",
                              str(target), "--overwrite"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith(f"error: --output {target}: ")
    assert ("the input --input" in err) if where == "input" else ("inside the" in err or "input --checkpoint" in err)
    assert (snapshot(run_dir), inp.read_bytes()) == before


def test_check_output_path_refuses_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path, "--output")


def test_export_out_policy(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    for out in (run_dir, run_dir / "best", run_dir / "best" / "hf", run_dir / "hf"):
        assert export_main(["--checkpoint", str(run_dir), "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: --out ") for line in err)
    assert snapshot(run_dir) == before
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert export_main(["--checkpoint", str(run_dir), "--out", str(user), "--overwrite"]) == 1
    assert "holds notes.txt, which minbert did not write" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "keep me"
    out = tmp_path / "hf"
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # a lock file is not content: the folder counts as empty
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    first = snapshot(out)
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 1  # exists, no --overwrite
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert snapshot(out) == first and sorted(os.listdir(tmp_path)) == ["hf", "mine"]  # nothing beside it


def test_disk_full_is_recognised_in_every_form(tmp_path, monkeypatch):
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                               'space left on device" })'))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), tmp_path)
    monkeypatch.setattr("minbert.io.disk_full._free_blocks", lambda path: 0)
    assert disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), tmp_path)
    with pytest.raises(DiskFullError, match=f"^{tmp_path / 'x'}: no space left on device"):
        with no_space_guard(tmp_path / "x"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_export_leaves_nothing_and_a_retry_works(run_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the heads, after the encoder was written
            raise Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {out}: no space left on device (free some space and run the same command again)\n"
    assert os.listdir(tmp_path) == []  # no partial export, no temporary folder
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0


def test_build_dir_keeps_the_old_folder_when_the_build_fails(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with build_dir(target) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "old" and os.listdir(tmp_path) == ["t"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (user and mount namespaces)")
def test_a_real_full_disk_is_one_line(run_dir, tmp_path):
    """A 1 MiB tmpfs in a private mount namespace: the export (17 MB of weights) and a --output fill it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} || exit 77; "
              f"{sys.executable} -m minbert.export --checkpoint {run_dir} --out {mnt}/hf; echo rc=$?; ls -A {mnt}; "
              f"head -c 2000000 /dev/zero > {mnt}/filler 2>/dev/null; "
              f"{sys.executable} -m minbert.predict_cli --checkpoint {run_dir} --task sst 'a film' --output {mnt}/p.csv;"
              f" echo rc=$?; ls -A {mnt}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode == 77 or "Operation not permitted" in proc.stderr:
        pytest.skip("cannot mount a tmpfs here")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {mnt}/hf: no space left on device (free some space and run the same command again)",
                      f"error: {mnt}/p.csv: no space left on device (free some space and run the same command again)"], \
        proc.stderr
    assert proc.stdout.split() == ["rc=1", "rc=1", "filler"], proc.stdout  # nothing partial, no temporary file


def test_atomic_write_text_names_a_full_disk(tmp_path, monkeypatch):
    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(DiskFullError, match="no space left on device"):
        atomic_write_text(tmp_path / "f.txt", "x")
    assert os.listdir(tmp_path) == []


def test_output_dir_never_holds_or_lies_in_the_checkpoint_it_reads(run_dir, tmp_path):
    from minbert.io.output_policy import check_run_inputs

    for out, overwrite in ((run_dir / "best", False), (run_dir / "best" / "p", False), (run_dir, True)):
        with pytest.raises(ValueError, match=f"^--output_dir {out}"):
            check_run_inputs(out, {"--checkpoint": run_dir / "best", "--model_name_or_path": None}, overwrite)
    check_run_inputs(tmp_path / "new", {"--checkpoint": run_dir / "best"}, True)
    check_run_inputs(run_dir, {"--model_name_or_path": "bert-tiny"}, True)  # a preset is no folder
