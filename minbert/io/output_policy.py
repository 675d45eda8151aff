"""Where minbert may write a user-named output: one policy for minbert-predict --output, minbert-export --out
and the inputs of a training run's --output_dir.

* An existing file is replaced only when the user asks (``--overwrite``); the write itself is atomic
  (:func:`minbert.io.atomic_write_text`, :func:`minbert.io.build_dir`).
* Never over an input of the same command, and never into a checkpoint, run or export folder (they hold only what
  minbert wrote there; a stray file inside would be deleted or mistaken for part of the run), whatever the flags.
* Paths are compared after resolving symbolic links, so a link cannot smuggle a write into a protected place.
"""
from __future__ import annotations

import os
from pathlib import Path

LOCK_FILE = ".minbert.lock"  # a run's or export's lock file: never counted as content of a folder


def minbert_folder_kind(directory: Path) -> str | None:
    """``checkpoint``, ``export folder`` or ``run folder`` when ``directory`` is one that minbert wrote, else None."""
    has = lambda name: os.path.lexists(directory / name)  # noqa: E731
    if has("heads.safetensors") and has("multitask.json"):
        return "export folder"
    if has("multitask.json") or (has("model.safetensors") and has("trainer_state.json")):
        return "checkpoint"
    if has("args.json") or has("results.json") or has("metrics.jsonl"):
        return "run folder"
    return None


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def protected_ancestor(path: str | Path) -> tuple[Path, str] | None:
    """The nearest folder above ``path`` that minbert wrote (a checkpoint, export or run folder), with its kind."""
    for parent in _resolved(path).parents:
        kind = minbert_folder_kind(parent)
        if kind:
            return parent, kind
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_path(path: str | Path, flag: str, inputs: dict[str, str | Path] | None = None,
                      overwrite: bool = False) -> Path:
    """``path`` if the command may write the file there, else a one-line ValueError naming ``flag``.
    ``inputs``: the command's input files and folders, by the flag that named them."""
    path = Path(path)
    target = _resolved(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    for name, source in (inputs or {}).items():
        src = _resolved(source)
        if target == src or (src.is_dir() and _inside(target, src)):
            raise ValueError(f"{flag} {path}: would write over the input {name} {source}; choose another file")
    found = protected_ancestor(target)
    if found:
        folder, kind = found
        raise ValueError(f"{flag} {path}: inside the {kind} {folder}, which holds only what minbert writes there; "
                         "choose a file outside it")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{flag} {path}: exists; pass --overwrite to replace it")
    return path


def folder_content(directory: Path) -> list[str]:
    """Names in ``directory``, without the lock file a writer holds there."""
    return sorted(n for n in os.listdir(directory) if n != LOCK_FILE)


def check_output_folder(path: str | Path, flag: str, inputs: dict[str, str | Path], owned: tuple[str, ...],
                        overwrite: bool = False) -> Path:
    """A folder the command builds whole (minbert-export --out): not an input, not inside or around one, not in a
    minbert folder; an existing one is replaced only with ``overwrite`` and only when it holds nothing but the
    files ``owned`` (what the command writes), so a replacement never deletes a user's files."""
    path = Path(path)
    target = _resolved(path)
    for name, source in inputs.items():
        src = _resolved(source)
        if _inside(target, src) or _inside(src, target):
            raise ValueError(f"{flag} {path}: {'is' if target == src else 'overlaps'} the input {name} {source}; "
                             "choose another folder")
    found = protected_ancestor(target)
    if found:
        folder, kind = found
        raise ValueError(f"{flag} {path}: inside the {kind} {folder}; choose a folder outside it")
    if not os.path.lexists(path):
        return path
    if not target.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    kind = minbert_folder_kind(target)
    if kind and kind != "export folder":
        raise ValueError(f"{flag} {path}: is a minbert {kind}; choose another folder")
    content = folder_content(target)
    if content and not overwrite:
        raise ValueError(f"{flag} {path}: exists and is not empty; pass --overwrite to replace it")
    foreign = [n for n in content if n not in owned]
    if foreign:
        raise ValueError(f"{flag} {path}: holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}"
                         ", which minbert did not write; --overwrite replaces only a folder it wrote: choose another")
    return path


def check_run_inputs(output_dir: str | Path, inputs: dict[str, str | Path | None], overwrite: bool) -> None:
    """A training run's --output_dir must not be (or be inside) an input folder, and with --overwrite_output_dir
    must not hold one (its clearing would delete the input being read)."""
    out = _resolved(output_dir)
    for name, source in inputs.items():
        if source is None or not os.path.isdir(source):
            continue
        src = _resolved(source)
        if _inside(out, src):
            raise ValueError(f"--output_dir {output_dir}: {'is' if out == src else 'inside'} the input {name} "
                             f"{source}; choose another folder")
        if overwrite and _inside(src, out):
            raise ValueError(f"--output_dir {output_dir} holds the input {name} {source}, which "
                             "--overwrite_output_dir would delete; choose another folder")
