"""Seeded fuzzing of checkpoint directories (--predict_only --checkpoint, minbert-export) and model directories
(--model_name_or_path DIR, Hugging Face layout): every damaged, mismatched or non-regular file must give one line
naming that file (and the tensor or key), never a traceback, a hang or an allocation of an absurd model; a run
that fails leaves no output behind. Also: published files get the usual permissions (0666 minus the umask).

The directories hold a tiny encoder (hidden 16, one layer, a 60-token vocabulary) so every case takes
milliseconds; a few cases go through train_multitask.py's entry point in-process.
"""
from __future__ import annotations

import json
import logging
import os
import random
import stat
import string
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from minbert.cli import train_main
from minbert.export import export_checkpoint
from minbert.io import PUBLISHED_MODE
from minbert.model.config import BertConfig
from minbert.model.encoder import BertModel, to_hf_state_dict
from minbert.model.multitask import MultitaskBert, MultitaskConfig
from minbert.model.tokenizer import load_tokenizer

from .conftest import no_hang

SEED = 20261121
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase),
         *string.punctuation[:4]]
TINY = dict(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64)


def write_model_dir(directory: Path, config: BertConfig, seed: int = 0) -> Path:
    """A Hugging Face model directory: config.json, model.safetensors (HF keys), vocab.txt."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / "config.json")
    save_file(to_hf_state_dict(BertModel(config).state_dict()), str(directory / "model.safetensors"))
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("hf") / "tiny", BertConfig(**TINY))


@pytest.fixture(scope="module")
def checkpoint_dir(model_dir, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MultitaskBert(BertModel.from_pretrained(model_dir), MultitaskConfig())
    directory = tmp_path_factory.mktemp("ckpt") / "best"
    model.save(directory, load_tokenizer(model_dir, max_seq_length=32))
    return directory


# ---------------------------------------------------------------------------------------------------------
# Mutations. Each takes (rng, directory) and damages one file of it; it returns the file the error must name
# (the directory itself when a file is missing).

def _edit_json(name: str, edit: Callable[[dict, random.Random], object]):
    def mutate(rng: random.Random, d: Path) -> Path:
        path = d / name
        value = json.loads(path.read_text(encoding="utf-8"))
        result = edit(value, rng)
        path.write_text(json.dumps(value if result is None else result), encoding="utf-8")
        return path
    return mutate


def _set(key: str, *choices):
    return lambda value, rng: value.__setitem__(key, rng.choice(choices))


def _write(name: str, *contents: bytes):
    def mutate(rng, d):
        (d / name).write_bytes(rng.choice(contents))
        return d / name
    return mutate


def _remove(name: str):
    def mutate(rng, d):
        (d / name).unlink()
        return d
    return mutate


def _non_regular(name: str, kind: str):
    def mutate(rng, d):
        path = d / name
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
            (path / "inside").write_text("x")
        elif kind == "dangling_symlink":
            path.symlink_to(d / "no-such-file")
        elif kind == "symlink_loop":
            path.symlink_to(path)
        elif kind == "device":
            path.symlink_to("/dev/zero")  # endless: reading it whole would never finish
        return path
    return mutate


def _truncate(name: str):
    def mutate(rng, d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: rng.randint(0, len(data) - 1)])
        return d / name
    return mutate


def _flip_bytes(name: str):
    def mutate(rng, d):
        data = bytearray((d / name).read_bytes())
        for _ in range(8):  # in the header (its first 8 bytes are the header's length)
            data[rng.randrange(min(len(data), 200))] = rng.randrange(256)
        (d / name).write_bytes(bytes(data))
        return d / name
    return mutate


def _retensor(name: str, change: str):
    """Rewrite a weights file with one tensor changed: reshaped, removed, added, or an integer dtype."""
    def mutate(rng, d):
        path = d / name
        state = load_file(str(path))
        key = rng.choice(sorted(state))
        if change == "shape":
            state[key] = torch.zeros(*(s + 1 for s in state[key].shape))
        elif change == "missing":
            del state[key]
        elif change == "extra":
            state["heads.extra.weight"] = torch.zeros(3)
        elif change == "dtype":
            state[key] = state[key].to(torch.int32)
        save_file(state, str(path))
        return path
    return mutate


def _other_size(name: str):
    """The weights file of another model size (hidden 32 instead of 16), under the same key names."""
    def mutate(rng, d):
        other = BertConfig(**{**TINY, "hidden_size": 32, "intermediate_size": 64})
        if name == "model.safetensors" and (d / "multitask.json").exists():
            state = MultitaskBert(BertModel(other), MultitaskConfig()).state_dict()
        else:
            state = to_hf_state_dict(BertModel(other).state_dict())
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / name))
        return d / name
    return mutate


def _bin_file(kind: str):
    def mutate(rng, d):
        (d / "model.safetensors").unlink()
        path = d / "pytorch_model.bin"
        if kind == "garbage":
            path.write_bytes(bytes(rng.randrange(256) for _ in range(512)))
        elif kind == "code":  # a pickle that would run os.system: weights_only refuses it
            import pickle

            class Evil:
                def __reduce__(self):
                    return (os.system, ("echo pwned",))
            path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
        elif kind == "not_tensors":
            torch.save({"embeddings.word_embeddings.weight": [1, 2, 3]}, path)
        elif kind == "other_size":
            other = BertConfig(**{**TINY, "hidden_size": 32, "intermediate_size": 64})
            torch.save(to_hf_state_dict(BertModel(other).state_dict()), path)
        return path
    return mutate


def _vocab(kind: str):
    def mutate(rng, d):
        path = d / "vocab.txt"
        lines = path.read_bytes().split(b"\n")
        if kind == "invalid_utf8":
            k = rng.randrange(5, len(VOCAB))
            lines[k] += rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
            path.write_bytes(b"\n".join(lines))
            return f"{path}:{k + 1}:"
        if kind == "no_cls":
            path.write_bytes(b"\n".join(l for l in lines if l != b"[CLS]"))
        elif kind == "too_many":  # token ids beyond config.json's vocab_size
            path.write_bytes(b"\n".join(lines[:-1] + [f"extra{i}".encode() for i in range(5)]) + b"\n")
        elif kind == "empty":
            path.write_bytes(b"")
        return path
    return mutate


def _tokenizer_json(kind: str):
    def mutate(rng, d):
        path = d / "tokenizer.json"
        if kind == "garbage":
            path.write_bytes(rng.choice([b"", b"{", b"[]", b'{"model": 3}', b"\xff\xfe", bytes(range(256))]))
        elif kind == "too_big":  # a tokenizer of the 30522-token vocabulary: ids beyond vocab_size
            path.write_text(load_tokenizer("bert-tiny").to_str(), encoding="utf-8")
        return path
    return mutate


CONFIG_MUTATIONS = {
    "heads_zero": _edit_json("config.json", _set("num_attention_heads", 0)),
    "heads_negative": _edit_json("config.json", _set("num_attention_heads", -2)),
    "size_string": _edit_json("config.json", _set("hidden_size", "16", "sixteen")),
    "size_float": _edit_json("config.json", _set("intermediate_size", 32.0, 32.5)),
    "size_bool": _edit_json("config.json", _set("num_hidden_layers", True, False)),
    "size_null": _edit_json("config.json", _set("vocab_size", None)),
    "size_negative": _edit_json("config.json", _set("intermediate_size", -32, 0)),
    "not_divisible": _edit_json("config.json", _set("num_attention_heads", 3, 5)),
    "hidden_huge": _edit_json("config.json", _set("hidden_size", 1_000_000_000, 2**40)),
    "vocab_huge": _edit_json("config.json", _set("vocab_size", 10**12)),
    "layers_huge": _edit_json("config.json", _set("num_hidden_layers", 10**9)),
    "positions_huge": _edit_json("config.json", _set("max_position_embeddings", 10**11)),
    "hidden_act": _edit_json("config.json", _set("hidden_act", "swish", 3, None)),
    "dropout": _edit_json("config.json", _set("hidden_dropout_prob", 1.5, -0.1, "0.1")),
    "layer_norm_eps": _edit_json("config.json", _set("layer_norm_eps", 0, -1e-12, "x")),
    "pad_token_id": _edit_json("config.json", _set("pad_token_id", 10**6, -1)),
    "position_type": _edit_json("config.json", _set("position_embedding_type", "relative_key")),
    "not_object": _write("config.json", b"[]", b"3", b'"bert"', b"null"),
    "invalid_json": _write("config.json", b"{", b'{"hidden_size": }', b"", b"\xef\xbb\xbf{,}"),
    "invalid_utf8": _write("config.json", b'{"hidden_size": 16, "x": "\xff"}'),
    "config_missing": _remove("config.json"),
}
MULTITASK_MUTATIONS = {
    "unknown_task": _edit_json("multitask.json", _set("tasks", ["sst", "mnli"], ["SST"], [3])),
    "tasks_not_list": _edit_json("multitask.json", _set("tasks", "sst", None, {"sst": 1}, [])),
    "tasks_repeat": _edit_json("multitask.json", _set("tasks", ["sst", "sst", "qqp", "sts"])),
    "pooling": _edit_json("multitask.json", _set("pooling", "first", None, 1)),
    "sts_head": _edit_json("multitask.json", _set("sts_head", "bilinear", None)),
    "para_head": _edit_json("multitask.json", _set("para_head", "concat", 0)),
    "head_dropout": _edit_json("multitask.json", _set("head_dropout", 1, 1.5, -0.1, "0.1", None, True)),
    "extra_key": _edit_json("multitask.json", _set("hidden", 3)),
    "mt_not_object": _write("multitask.json", b"[]", b"null"),
    "mt_invalid_json": _write("multitask.json", b"{'tasks': []}", b""),
    "mt_missing": _remove("multitask.json"),
}


def _weights_mutations(name: str) -> dict:
    return {
        "weights_other_size": _other_size(name),
        "weights_reshaped": _retensor(name, "shape"),
        "weights_missing_tensor": _retensor(name, "missing"),
        "weights_int_dtype": _retensor(name, "dtype"),
        "weights_truncated": _truncate(name),
        "weights_flipped": _flip_bytes(name),
        "weights_garbage": _write(name, b"", b"\x00" * 16, b"not safetensors at all"),
        "weights_missing": _remove(name),
    }


def _non_regular_mutations(names) -> dict:
    return {f"{name}-{kind}": _non_regular(name, kind) for name in names
            for kind in ("fifo", "directory", "dangling_symlink", "symlink_loop", "device")}


CHECKPOINT_MUTATIONS = {
    **CONFIG_MUTATIONS, **MULTITASK_MUTATIONS, **_weights_mutations("model.safetensors"),
    "weights_extra_tensor": _retensor("model.safetensors", "extra"),
    "tokenizer_garbage": _tokenizer_json("garbage"),
    "tokenizer_too_big": _tokenizer_json("too_big"),
    "tokenizer_missing": _remove("tokenizer.json"),
    **_non_regular_mutations(("config.json", "multitask.json", "model.safetensors", "tokenizer.json")),
}
MODEL_DIR_MUTATIONS = {
    **CONFIG_MUTATIONS, **_weights_mutations("model.safetensors"),
    **{f"bin_{kind}": _bin_file(kind) for kind in ("garbage", "code", "not_tensors", "other_size")},
    **{f"vocab_{kind}": _vocab(kind) for kind in ("invalid_utf8", "no_cls", "too_many", "empty")},
    "tokenizer_json_garbage": _tokenizer_json("garbage"),
    "tokenizer_json_too_big": _tokenizer_json("too_big"),
    **_non_regular_mutations(("config.json", "model.safetensors", "vocab.txt")),
}
# A model directory may lack its weights only if it has pytorch_model.bin; without either: an error naming the dir.


def damage(source: Path, target: Path, mutation: Callable, case: str) -> str:
    """Copy ``source`` to ``target`` and damage it; return what the error message must start with."""
    import shutil

    shutil.copytree(source, target)
    named = mutation(random.Random(f"{SEED}/{case}"), target)
    return str(named) if isinstance(named, str) and named.endswith(":") else f"{named}:"


def check_one_line(message: str, prefix: str) -> None:
    assert "\n" not in message and len(message) < 600, message[:600]
    assert message.startswith(prefix), f"expected {prefix!r} first: {message!r}"


def load_like_predict_only(directory: Path) -> MultitaskBert:
    """What train_multitask.py --predict_only reads of --checkpoint, in its order: tokenizer, then model."""
    load_tokenizer(directory)
    return MultitaskBert.load(directory)


def load_like_training(directory: Path) -> BertModel:
    """What a training run reads of --model_name_or_path DIR, in its order: tokenizer, then encoder."""
    load_tokenizer(directory)
    return BertModel.from_pretrained(directory)


@pytest.mark.parametrize("mutation", CHECKPOINT_MUTATIONS)
def test_damaged_checkpoint_directory(checkpoint_dir, tmp_path, mutation):
    target = tmp_path / "best"
    prefix = damage(checkpoint_dir, target, CHECKPOINT_MUTATIONS[mutation], f"ckpt/{mutation}")
    with no_hang(), pytest.raises(ValueError) as e:  # DataError is a ValueError; the CLI prints it as one line
        load_like_predict_only(target)
    check_one_line(str(e.value), prefix)


@pytest.mark.parametrize("mutation", MODEL_DIR_MUTATIONS)
def test_damaged_model_directory(model_dir, tmp_path, mutation):
    target = tmp_path / "model"
    prefix = damage(model_dir, target, MODEL_DIR_MUTATIONS[mutation], f"model/{mutation}")
    with no_hang(), pytest.raises(ValueError) as e:
        load_like_training(target)
    check_one_line(str(e.value), prefix)


def test_undamaged_directories_load(checkpoint_dir, model_dir):
    assert isinstance(load_like_predict_only(checkpoint_dir), MultitaskBert)
    assert isinstance(load_like_training(model_dir), BertModel)


def test_export_refuses_a_damaged_checkpoint(checkpoint_dir, tmp_path):
    for mutation in ("weights_other_size", "head_dropout", "tokenizer_garbage", "model.safetensors-fifo"):
        target = tmp_path / mutation
        prefix = damage(checkpoint_dir, target, CHECKPOINT_MUTATIONS[mutation], f"ckpt/{mutation}")
        out = tmp_path / f"{mutation}-out"
        with no_hang(), pytest.raises(ValueError) as e:
            export_checkpoint(target, out)
        check_one_line(str(e.value), prefix)
        assert not out.exists()


def test_absurd_sizes_are_refused_before_allocating():
    for field, value in (("hidden_size", 2**20), ("vocab_size", 10**10), ("num_hidden_layers", 10**7)):
        heads = {"num_attention_heads": 1} if field == "hidden_size" else {}
        with pytest.raises(ValueError, match="parameters .* over the limit"):
            BertConfig(**{**TINY, **heads, field: value})
    large = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    assert large.num_parameters() == 335_141_888  # bert-large fits (transformers counts the same)


# ---------------------------------------------------------------------------------------------------------
# Through train_multitask.py's entry point, in-process: exit status 1, one line on stderr, nothing written.

def run_train(argv: list[str], capsys) -> tuple[int, str]:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # train_main configures logging on the stderr this test captures
    try:
        with no_hang(30):
            rc = train_main(argv)
    finally:
        root.handlers[:] = saved
    return rc, capsys.readouterr().err


TINY_ARGS = ["--max_eval_samples", "4", "--max_train_samples", "8", "--per_device_train_batch_size", "4",
             "--max_steps_per_epoch", "1", "--num_train_epochs", "1", "--max_seq_length", "32", "--device", "cpu"]
CLI_CHECKPOINT_CASES = ["heads_zero", "hidden_huge", "unknown_task", "head_dropout", "weights_other_size",
                        "weights_truncated", "tokenizer_too_big", "model.safetensors-fifo", "config.json-dangling_symlink"]
CLI_MODEL_CASES = ["size_string", "vocab_huge", "weights_reshaped", "bin_code", "vocab_invalid_utf8", "vocab.txt-fifo"]


def assert_failed_in_one_line(rc: int, err: str, prefix: str, out: Path) -> None:
    """Exit 1, one `error: ...` line naming the damaged file, no traceback, no output directory."""
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    check_one_line(lines[0][len("error: "):], prefix)
    assert not out.exists()


@pytest.mark.parametrize("mutation", CLI_CHECKPOINT_CASES)
def test_predict_only_cli_on_damaged_checkpoint(checkpoint_dir, small_data, tmp_path, capsys, mutation):
    target = tmp_path / "best"
    prefix = damage(checkpoint_dir, target, CHECKPOINT_MUTATIONS[mutation], f"ckpt/{mutation}")
    out = tmp_path / "run"
    rc, err = run_train(["--predict_only", "--checkpoint", str(target), "--data_dir", str(small_data),
                         "--output_dir", str(out), *TINY_ARGS], capsys)
    assert_failed_in_one_line(rc, err, prefix, out)


@pytest.mark.parametrize("mutation", CLI_MODEL_CASES)
def test_train_cli_on_damaged_model_directory(model_dir, small_data, tmp_path, capsys, mutation):
    target = tmp_path / "model"
    prefix = damage(model_dir, target, MODEL_DIR_MUTATIONS[mutation], f"model/{mutation}")
    out = tmp_path / "run"
    rc, err = run_train(["--model_name_or_path", str(target), "--data_dir", str(small_data),
                         "--output_dir", str(out), *TINY_ARGS], capsys)
    assert_failed_in_one_line(rc, err, prefix, out)


def test_predict_only_cli_on_good_checkpoint(checkpoint_dir, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_train(["--predict_only", "--checkpoint", str(checkpoint_dir), "--data_dir", str(small_data),
                         "--output_dir", str(out), *TINY_ARGS], capsys)
    assert rc == 0, err[-2000:]
    assert json.loads((out / "results.json").read_text())["checkpoint"] == str(checkpoint_dir)


# ---------------------------------------------------------------------------------------------------------
# Permissions: every published file, weights included, gets 0666 minus the umask (safetensors replaces the
# temporary file with its own 0600 one: the atomic helpers set the mode just before publishing).

def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


def test_published_files_have_the_usual_permissions(model_dir, tmp_path):
    from minbert.io import replace_dir

    expected = 0o666 & ~_current_umask()
    assert PUBLISHED_MODE == expected
    model = MultitaskBert(BertModel.from_pretrained(model_dir), MultitaskConfig())
    tokenizer = load_tokenizer(model_dir)
    replace_dir(tmp_path / "best", lambda d: model.save(d, tokenizer))  # best/ and last/ are written this way
    modes = _modes(tmp_path / "best")
    assert {"model.safetensors", "config.json", "multitask.json", "tokenizer.json"} <= set(modes)
    assert set(modes.values()) == {expected}, {k: oct(v) for k, v in modes.items()}
    export_checkpoint(tmp_path / "best", tmp_path / "exported")
    modes = _modes(tmp_path / "exported")
    assert {"model.safetensors", "heads.safetensors"} <= set(modes)
    assert set(modes.values()) == {expected}, {k: oct(v) for k, v in modes.items()}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
