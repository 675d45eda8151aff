"""Export a minbert checkpoint's fine-tuned encoder in the Hugging Face layout: ``minbert-export``.

    minbert-export --checkpoint runs/default/best --out exported/
    python -m minbert.export --checkpoint runs/default/best --out exported/

The output directory loads with ``transformers.BertModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``
(and with ``--model_name_or_path`` here, to fine-tune further):

    config.json             BertConfig with model_type "bert" and architectures ["BertModel"]
    model.safetensors       the encoder under Hugging Face BertModel key names (query/key/value split again)
    tokenizer.json          the checkpoint's tokenizer, without our per-run truncation and padding settings
    vocab.txt               its WordPiece vocabulary, one token per line in id order
    tokenizer_config.json   BertTokenizer settings matching the tokenizer's normalizer
    heads.safetensors       the task heads, under MultitaskBert's key names (``heads.sst.classifier.weight``...)
    multitask.json          the MultitaskConfig the heads belong to (tasks, pooling, head kinds)

The folder is built whole in a temporary folder beside ``--out`` and renamed into place (minbert.io.build_dir): an
interrupted or failed export (a full disk) leaves no partial folder that would block running it again. ``--out``
follows minbert.io.output_policy: never an input or inside a checkpoint or run folder; an existing one is replaced
only with ``--overwrite`` and only when it holds nothing but an export's files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from minbert.io import atomic_save, atomic_write_text, build_dir, json_text
from minbert.io.output_policy import LOCK_FILE, check_output_folder
from minbert.model.encoder import to_hf_state_dict
from minbert.model.multitask import MultitaskBert, resolve_checkpoint
from minbert.model.tokenizer import read_tokenizer_json

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json")
HEAD_FILES = ("heads.safetensors", "multitask.json")


def wordpiece_vocab(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's WordPiece vocabulary as a list indexed by token id (the vocab.txt layout)."""
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") != "WordPiece":
        raise ValueError(f"the checkpoint's tokenizer is {model.get('type')}, not WordPiece: cannot write vocab.txt")
    by_id = {i: token for token, i in model["vocab"].items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("the checkpoint's WordPiece vocabulary does not have contiguous ids 0..N-1")
    return [by_id[i] for i in range(len(by_id))]


def tokenizer_config(tokenizer: Tokenizer, vocab: list[str], model_max_length: int) -> dict:
    """tokenizer_config.json for transformers' BertTokenizer. Its normalizer options must match the ones in
    tokenizer.json: transformers rebuilds the normalizer from these settings."""
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        raise ValueError(f"the checkpoint's tokenizer has a {normalizer.get('type')} normalizer, not BertNormalizer")
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    missing = [t for t in special.values() if t not in vocab and t != "[MASK]"]
    if missing:
        raise ValueError(f"the checkpoint's vocabulary lacks the special token(s) {', '.join(missing)}")
    if "[MASK]" not in vocab:
        del special["mask_token"]
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": normalizer.get("lowercase", True),
        "strip_accents": normalizer.get("strip_accents"),
        "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
        "model_max_length": model_max_length,
        **special,
    }


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the encoder of minbert checkpoint directory ``checkpoint`` to ``out`` in the Hugging Face layout,
    with the heads beside it (heads.safetensors + multitask.json). Returns ``out``."""
    from safetensors.torch import save_file

    given, out = checkpoint, Path(out)
    checkpoint = resolve_checkpoint(checkpoint)  # a run's --output_dir means its best/
    check_output_folder(out, "--out", {"--checkpoint": given}, HF_FILES + HEAD_FILES, overwrite)

    model = MultitaskBert.load(checkpoint)
    if not os.path.lexists(checkpoint / "tokenizer.json"):
        raise ValueError(f"{checkpoint}: no tokenizer.json (a checkpoint saved without its tokenizer)")
    tokenizer = read_tokenizer_json(checkpoint / "tokenizer.json")
    # The checkpoint keeps the training run's truncation (--max_seq_length); a released tokenizer should not.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    vocab = wordpiece_vocab(tokenizer)
    config = model.encoder.config
    if len(vocab) != config.vocab_size:
        raise ValueError(f"{checkpoint}: tokenizer has {len(vocab)} tokens but the encoder's vocab_size is {config.vocab_size}")
    tok_config = tokenizer_config(tokenizer, vocab, config.max_position_embeddings)

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    heads = {k: v for k, v in state.items() if k.startswith("heads.")}
    hf_state = to_hf_state_dict(encoder)

    with build_dir(out, ignore=(LOCK_FILE,)) as tmp:  # a failure (a full disk) leaves --out as it was
        config.save(tmp / "config.json")
        atomic_save(tmp / "model.safetensors", lambda p: save_file(hf_state, str(p), metadata={"format": "pt"}))
        atomic_write_text(tmp / "tokenizer.json", tokenizer.to_str(pretty=True))
        atomic_write_text(tmp / "vocab.txt", "".join(token + "\n" for token in vocab))
        atomic_write_text(tmp / "tokenizer_config.json", json_text(tok_config) + "\n")
        atomic_save(tmp / "heads.safetensors", lambda p: save_file(heads, str(p), metadata={"format": "pt"}))
        atomic_save(tmp / "multitask.json", lambda p: shutil.copyfile(checkpoint / "multitask.json", p))
    return out


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minbert-export",
        description="Write the fine-tuned encoder of a minbert checkpoint in the Hugging Face layout "
                    "(transformers.BertModel / AutoTokenizer .from_pretrained load it); the task heads go "
                    "beside it in heads.safetensors + multitask.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="a minbert checkpoint directory (e.g. runs/default/best: model.safetensors, config.json, "
                        "multitask.json, tokenizer.json), or a run's --output_dir (its best/ is exported)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="the Hugging Face model directory to write (built beside it and "
                                                "renamed into place; not inside a checkpoint or run folder)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that holds an earlier export (and nothing else)")
    return p


def main(argv: list[str] | None = None) -> int:
    from minbert.cli import _run_user_command

    args = export_parser().parse_args(argv)

    def go():
        from minbert.io.folder_lock import lock_beside

        with lock_beside(args.out):  # one export per --out (a lock file beside it: the folder is replaced whole)
            out = export_checkpoint(args.checkpoint, args.out, args.overwrite)
        print(f"exported the encoder to {out} ({', '.join(HF_FILES)}); heads in {', '.join(HEAD_FILES)}")

    return _run_user_command(go)


if __name__ == "__main__":
    raise SystemExit(main())
