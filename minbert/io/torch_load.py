"""The one reader of torch archives (pytorch_model.bin, optimizer.pt, training_state.pt): ``torch.load`` with
``weights_only=True``, never plain pickle, and a refusal that does not suggest the unsafe option.

torch's own refusal begins "Weights only load failed. This file can still be loaded ..." and advises re-running
with ``weights_only=False``, which executes whatever code the pickle names. We keep only its diagnosis (the
``WeightsUnpickler error`` line: which global it refused) and say what minbert accepts instead.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from minbert.io import check_regular_file

_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
                KeyError, IndexError, UnicodeDecodeError)  # whatever a damaged archive makes torch.load raise


def torch_load_problem(error: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file, without torch's advice to turn the
    safety off."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "weights only load failed" in text.lower() or "weights_only" in text:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
        # its first clause only: torch goes on to explain how to allowlist the class, which is not advice to give
        reason = re.split(r" was not an allowed global|\. ", found.group(1))[0].strip().rstrip(".") if found else ""
        detail = f" ({reason})" if reason else ""
        return (f"refused: it holds pickled Python objects, not only tensors{detail}; minbert loads plain tensor "
                "archives and safetensors only, since unpickling an object can run code")
    return f"cannot read: {text.strip().splitlines()[0] if text.strip() else type(error).__name__}"


def load_torch_file(path: str | Path):
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a one-line ValueError naming ``path``."""
    path = check_regular_file(path)  # a FIFO would block torch.load
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: {torch_load_problem(e)}") from None
