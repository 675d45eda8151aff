"""--pair_encoding cross: a sentence pair read as one sequence [CLS] a [SEP] b [SEP] with token types 0/1.

The encoder equals transformers.BertModel on the same joint inputs (token types, padding); tiny end-to-end runs in
each mode write the six prediction files; --predict_only, export, every combiner, SMART, bf16 and torchrun work
with it; a resumed cross-encoded run is bit-identical; long pairs truncate longest-first; the flag's parser.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.cli import train_main, train_parser
from minbert.model.multitask import MultitaskBert, MultitaskConfig, format_pair_encoding, parse_pair_encoding
from minbert.model.pooling import pool
from minbert.model.tokenizer import load_tokenizer, pad_token_id
from minbert.tasks.data import TASKS, Example, TaskData, load_task, tensorize
from minbert.training.run import build_model
from minbert.training.run_config import RunConfig
from minbert.training.trainer import Trainer

from .test_cli_errors import usage_error
from .test_resume import assert_same_weights, last_step, run_cli, train_argv

SIX = ["sst-dev-output.csv", "sst-test-output.csv", "para-dev-output.csv", "para-test-output.csv",
       "sts-dev-output.csv", "sts-test-output.csv"]


# ----------------------------------------------------------------------------------------------------------
# The encoder on joint sequences equals transformers.BertModel


def joint_batch(small_data, task: str, tokenizer, n: int = 6) -> dict[str, torch.Tensor]:
    """``n`` real pairs of ``task`` as one padded batch of joint sequences (rows of different lengths)."""
    data = tensorize(load_task(task, "dev", small_data, max_samples=n), tokenizer, "cross")
    return data.batch(list(range(n)), pad_token_id(tokenizer))


def hf_twin(transformers, encoder: BertModel):
    hf_cfg = transformers.BertConfig(**{k: v for k, v in encoder.config.__dict__.items() if k != "add_pooling_layer"})
    hf = transformers.BertModel(hf_cfg).eval()
    from minbert.model.encoder import to_hf_state_dict

    missing, unexpected = hf.load_state_dict(to_hf_state_dict(encoder.state_dict()), strict=False)
    assert not unexpected and all(k.endswith(("position_ids", "token_type_ids")) for k in missing)
    return hf


def check_against_transformers(encoder: BertModel, small_data, tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = hf_twin(transformers, encoder)
    for pooling in ("cls", "mean", "max"):
        model = MultitaskBert(encoder, MultitaskConfig(pooling=pooling, pair_encoding={"qqp": "cross", "sts": "cross"}))
        model.eval()
        for task in ("qqp", "sts"):
            batch = joint_batch(small_data, task, tokenizer)
            types, mask = batch["token_type_ids"], batch["attention_mask"]
            assert (mask == 0).any() and (types == 1).any()  # padding and both segments
            with torch.no_grad():
                ref = hf(input_ids=batch["input_ids"], attention_mask=mask, token_type_ids=types)
                (embeds,) = model.embed_inputs(batch)
                ours = encoder.encode(embeds, mask)  # the multitask path (padding skipped outside attention)
                real = mask.bool()
                assert (ours.last_hidden_state - ref.last_hidden_state)[real].abs().max() <= 1e-5
                assert (ours.pooler_output - ref.pooler_output).abs().max() <= 1e-5
                # the whole forward: pooled joint sequence -> the cross head
                expected = model.heads[task](pool(ref, mask, pooling))
                assert (model(task, batch) - expected).abs().max() <= 1e-5


def test_encoder_equals_transformers_on_joint_sequences_random_bert_base_shape(small_data):
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(num_hidden_layers=2)).eval()  # bert-base's widths (768, 12 heads), 2 layers
    check_against_transformers(encoder, small_data, load_tokenizer("bert-base", 64))


@pytest.mark.slow
def test_encoder_equals_transformers_on_joint_sequences_minilm_weights(small_data):
    check_against_transformers(BertModel.from_pretrained("minilm-l6").eval(), small_data, load_tokenizer("minilm-l6", 64))


# ----------------------------------------------------------------------------------------------------------
# Tokenization: the joint sequence, longest-first truncation


def pair_data(pairs: list[tuple[str, str]]) -> TaskData:
    spec = TASKS["sts"]
    return TaskData(spec, "dev", None, [Example(str(i), p, 1.0, i + 2) for i, p in enumerate(pairs)])


def segments(tokenizer, ids: list[int], types: list[int]) -> tuple[list[str], list[str]]:
    tokens = [tokenizer.id_to_token(i) for i in ids]
    a = [t for t, s in zip(tokens, types) if s == 0]
    b = [t for t, s in zip(tokens, types) if s == 1]
    assert a[0] == "[CLS]" and a[-1] == "[SEP]" and b[-1] == "[SEP]"
    return a[1:-1], b[:-1]


def test_joint_sequence_and_longest_first_truncation_keeps_both_sentences():
    tok = load_tokenizer("minilm-l6", 12)
    long = " ".join(["word"] * 40)
    data = tensorize(pair_data([("a cat sat", "a dog ran"), (long, "short one"), ("tiny", long), (long, long)]),
                     tok, "cross")
    (col,) = data.columns
    a, b = segments(tok, col.ids[0], col.type_ids[0])
    assert (a, b) == (["a", "cat", "sat"], ["a", "dog", "ran"])
    # too long: tokens come off the longer sentence first, so the short one is kept whole and neither vanishes
    assert segments(tok, col.ids[1], col.type_ids[1]) == (["word"] * 7, ["short", "one"])
    assert segments(tok, col.ids[2], col.type_ids[2]) == (["tiny"], ["word"] * 8)
    a, b = segments(tok, col.ids[3], col.type_ids[3])
    assert len(col.ids[3]) == 12 and abs(len(a) - len(b)) <= 1 and a and b
    batch = data.batch([0, 1])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["token_type_ids"][0].tolist() == col.type_ids[0] + [0] * (12 - len(col.ids[0]))  # padding: type 0
    # bi keeps two columns, no token types
    assert set(tensorize(pair_data([("a", "b")]), tok).batch([0])) == {
        "input_ids", "attention_mask", "input_ids_b", "attention_mask_b", "labels"}


def test_too_short_a_limit_for_a_pair_is_one_line():
    with pytest.raises(ValueError, match=r"^--max_seq_length 4: a sentence pair read as one sequence .* at least 5"):
        tensorize(pair_data([("a b", "c d")]), load_tokenizer("minilm-l6", 4), "cross")


def test_a_tokenizer_json_without_pair_template_gets_one(tmp_path):
    from minbert.model.encoder import resolve_model_dir
    from minbert.model.tokenizer import has_pair_template

    src = json.loads((resolve_model_dir("minilm-l6") / "tokenizer.json").read_text())
    src["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(src))
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path, 32)
    assert has_pair_template(tok)
    assert tok.encode("a b", "c").tokens == ["[CLS]", "a", "b", "[SEP]", "c", "[SEP]"]


# ----------------------------------------------------------------------------------------------------------
# The flag


@pytest.mark.parametrize("text,expected", [
    ("bi", {"qqp": "bi", "sts": "bi"}),
    ("cross", {"qqp": "cross", "sts": "cross"}),
    ("qqp=cross,sts=bi", {"qqp": "cross", "sts": "bi"}),
    ("sts=cross", {"qqp": "bi", "sts": "cross"}),
    (" qqp = cross , sts = cross ", {"qqp": "cross", "sts": "cross"}),
])
def test_pair_encoding_parser(text, expected):
    assert parse_pair_encoding(text) == expected
    assert parse_pair_encoding(format_pair_encoding(expected)) == expected


def test_pair_encoding_flag_is_stored_canonically_and_builds_the_heads():
    args = train_parser().parse_args(["--model_name_or_path", "bert-tiny", "--pair_encoding", "qqp=cross,sts=bi"])
    assert args.pair_encoding == "qqp=cross,sts=bi"
    assert train_parser().parse_args(["--pair_encoding", "qqp=cross,sts=cross"]).pair_encoding == "cross"
    assert train_parser().parse_args([]).pair_encoding == "bi"
    model = build_model(RunConfig.from_namespace(args))
    assert model.config.pair_encoding == {"qqp": "cross", "sts": "bi"}
    assert type(model.heads["qqp"]).__name__ == "CrossParaphraseHead"
    assert model.heads["qqp"].classifier.in_features == model.encoder.config.hidden_size
    assert type(model.heads["sts"]).__name__ == "CosineRegressionHead"  # the --sts_head default, bi
    sst_only = build_model(RunConfig.from_flags(["--model_name_or_path", "bert-tiny", "--tasks", "sst",
                                                 "--pair_encoding", "cross"]))
    assert sst_only.config.pair_encoding == {}


@pytest.mark.parametrize("value,message", [
    ("both", "'both': expected bi, cross or TASK=bi|cross,... (e.g. qqp=cross,sts=bi)"),
    ("qqp=joint", "qqp='joint': choose bi or cross"),
    ("sst=cross", "'sst' is not a sentence-pair task (pair tasks: qqp, sts)"),
    ("foo=cross", "'foo' is not a task (pair tasks: qqp, sts)"),
    ("qqp=cross,qqp=bi", "qqp is given twice"),
    ("", "'': expected bi, cross or TASK=bi|cross,... (e.g. qqp=cross,sts=bi)"),
])
def test_bad_pair_encoding_is_one_line(capsys, value, message):
    from .conftest import ROOT

    argv = ["--data_dir", str(ROOT / "data"), f"--pair_encoding={value}"]
    assert usage_error(train_main, argv, capsys) == f"argument --pair_encoding: {message}"


def test_comparison_heads_with_cross_are_refused_defaults_and_linear_heads_are_not(capsys):
    from .conftest import ROOT

    base = ["--data_dir", str(ROOT / "data"), "--model_name_or_path", "bert-tiny"]
    msg = usage_error(train_main, base + ["--pair_encoding", "sts=cross", "--sts_head", "cosine"], capsys)
    assert msg.startswith("--sts_head cosine compares two sentence embeddings, but --pair_encoding reads sts as one "
                          "sequence (cross)")
    msg = usage_error(train_main, base + ["--pair_encoding", "cross", "--para_head", "uv", "--sts_head", "cosine_2d1"],
                      capsys)
    assert msg.startswith("--sts_head cosine_2d1 compares")
    from minbert.cli import check_train_args

    p = train_parser()
    for extra in (["--pair_encoding", "cross"], ["--pair_encoding", "cross", "--para_head", "uv", "--sts_head", "linear"],
                  ["--pair_encoding", "qqp=cross", "--sts_head", "cosine"], ["--pair_encoding", "cross", "--tasks", "sst",
                                                                             "--sts_head", "cosine"]):
        check_train_args(p, p.parse_args(base + extra))  # no error


def test_checkpoint_without_pair_encoding_loads_as_bi(tmp_path):
    model = MultitaskBert(BertModel.from_pretrained("bert-tiny"), MultitaskConfig())
    model.save(tmp_path)
    config = json.loads((tmp_path / "multitask.json").read_text())
    del config["pair_encoding"]  # as written before cross-encoding existed
    (tmp_path / "multitask.json").write_text(json.dumps(config))
    loaded = MultitaskBert.load(tmp_path)
    assert loaded.config.encoding("qqp") == loaded.config.encoding("sts") == "bi"
    assert type(loaded.heads["qqp"]).__name__ == "ParaphraseHead"
    config["pair_encoding"] = {"sst": "cross"}
    (tmp_path / "multitask.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'sst' is not a sentence-pair task"):
        MultitaskBert.load(tmp_path)


def test_a_bi_batch_for_a_cross_model_is_a_clear_error(small_data):
    tok = load_tokenizer("bert-tiny", 32)
    model = MultitaskBert(BertModel.from_pretrained("bert-tiny"), MultitaskConfig(pair_encoding={"qqp": "cross"}))
    bi = tensorize(load_task("qqp", "dev", small_data, max_samples=4), tok)
    with pytest.raises(ValueError, match=r"qqp: the batch holds 2 sequence\(s\) per example but the model reads qqp "
                                         r"cross-encoded"):
        model("qqp", bi.batch([0, 1]))


# ----------------------------------------------------------------------------------------------------------
# Training: every combiner, SMART, bf16


@pytest.mark.parametrize("extra", [["--combiner", "individual", "--smart", "--bregman"], ["--combiner", "sum"],
                                   ["--combiner", "pcgrad"], ["--combiner", "gse", "--bf16"],
                                   ["--combiner", "gse", "--smart", "--smart_sigma", "0.1", "--smart_epsilon", "0.5"]])
def test_train_step_under_cross_encoding(small_data, tmp_path, one_thread, extra):
    config = RunConfig.from_flags(["--model_name_or_path", "bert-tiny", "--pair_encoding", "cross", "--seed", "3",
                                   "--per_device_train_batch_size", "4", "--max_seq_length", "32", *extra])
    tokenizer = load_tokenizer("bert-tiny", 32)
    model = build_model(config)
    train = {t: tensorize(load_task(t, "train", small_data, max_samples=8), tokenizer, model.config.encoding(t))
             for t in config.data.tasks}
    trainer = Trainer(config, model, train, {}, torch.device("cpu"), tokenizer, tmp_path, metrics=None)
    seen = []
    model.encoder.embeddings.register_forward_hook(lambda mod, inp, out: seen.append(inp[1].max().item()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    losses = trainer.train_step(0)
    assert set(losses) == {"sst", "qqp", "sts"} and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert 1 in seen  # the pair tasks' joint sequences carried token type 1
    changed = {k.split(".")[1] for k, v in model.state_dict().items() if k.startswith("heads.") and not torch.equal(v, before[k])}
    assert changed == {"sst", "qqp", "sts"}
    assert not torch.equal(model.encoder.embeddings.token_type.weight[1], before["encoder.embeddings.token_type.weight"][1])


# ----------------------------------------------------------------------------------------------------------
# End to end


def tiny_args(data_dir, out, *extra):
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "24", "--max_eval_samples", "12", "--per_device_train_batch_size", "8",
            "--num_train_epochs", "1", "--max_seq_length", "32", "--seed", "7", "--bf16", "off", *extra]


@pytest.fixture(scope="module")
def cross_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cross")
    assert train_main(tiny_args(small_data, out, "--pair_encoding", "cross")) == 0
    return out


@pytest.mark.parametrize("encoding", ["bi", "qqp=cross,sts=bi"])
def test_end_to_end_in_each_mode_writes_six_files(small_data, tmp_path, encoding, one_thread):
    assert train_main(tiny_args(small_data, tmp_path, "--pair_encoding", encoding)) == 0
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(SIX)
    saved = json.loads((tmp_path / "best" / "multitask.json").read_text())["pair_encoding"]
    assert saved == parse_pair_encoding(encoding)
    assert json.loads((tmp_path / "args.json").read_text())["pair_encoding"] == encoding


def test_cross_end_to_end_predict_only_and_export(cross_run, small_data, tmp_path):
    from minbert.export import export_checkpoint
    from minbert.tasks.predict import score_prediction_dir

    assert sorted(p.name for p in (cross_run / "predictions").iterdir()) == sorted(SIX)
    args = json.loads((cross_run / "args.json").read_text())
    assert args["pair_encoding"] == "cross" and args["bf16"] in ("on", "off")  # bf16 resolved, never "auto"
    results = json.loads((cross_run / "results.json").read_text())
    assert results["bf16"] == args["bf16"]
    scored = score_prediction_dir(cross_run / "predictions", small_data, allow_partial=True)
    assert scored["dev"]["overall"] == pytest.approx(results["dev"]["overall"], abs=1e-3)
    # args.json is a valid --config: the canonical encoding and the resolved bf16 parse back
    from minbert.cli import apply_config_file

    p = train_parser()
    apply_config_file(p, ["--config", str(cross_run / "args.json")])
    again = p.parse_args([])
    assert (again.pair_encoding, again.bf16) == ("cross", args["bf16"])
    # --predict_only reads the encoding from the checkpoint: the same predictions
    out = tmp_path / "predict"
    assert train_main(["--predict_only", "--checkpoint", str(cross_run / "best"), "--data_dir", str(small_data),
                       "--output_dir", str(out), "--max_eval_samples", "12", "--bf16", "off"]) == 0
    for name in SIX:
        assert (out / "predictions" / name).read_text() == (cross_run / "predictions" / name).read_text()
    # export: the heads and the encoding travel with the encoder
    exported = export_checkpoint(cross_run / "best", tmp_path / "hf")
    assert json.loads((exported / "multitask.json").read_text())["pair_encoding"] == {"qqp": "cross", "sts": "cross"}
    from safetensors.torch import load_file

    heads = load_file(str(exported / "heads.safetensors"))
    assert heads["heads.qqp.classifier.weight"].shape == (1, 128) and heads["heads.sts.regressor.weight"].shape == (1, 128)


def test_cross_with_bf16_end_to_end(small_data, tmp_path, one_thread):
    assert train_main(tiny_args(small_data, tmp_path, "--pair_encoding", "cross", "--bf16", "--tasks", "qqp,sts",
                                "--max_steps_per_epoch", "2")) == 0
    assert json.loads((tmp_path / "args.json").read_text())["bf16"] == "on"
    assert len(list((tmp_path / "predictions").iterdir())) == 4


@pytest.mark.slow
def test_resume_under_cross_encoding_is_bit_identical(small_data, tmp_path):
    extra = ("--pair_encoding", "cross", "--combiner", "pcgrad")
    reference = tmp_path / "reference"
    r = run_cli(train_argv(small_data, reference, *extra))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    r = run_cli(train_argv(small_data, out, *extra), MINBERT_TEST_KILL_AT_STEP="4")  # mid-epoch 2
    assert r.returncode == -signal.SIGKILL and last_step(out) == 3
    r = run_cli(train_argv(small_data, out, *extra, "--resume"))
    assert r.returncode == 0, r.stderr
    assert_same_weights(out / "best", reference / "best")
    assert_same_weights(out / "last", reference / "last")
    for name in SIX:
        assert (out / "predictions" / name).read_text() == (reference / "predictions" / name).read_text()


def test_sharded_prediction_subset_keeps_token_types(small_data):
    from minbert.training.distributed import subset

    data = tensorize(load_task("sts", "dev", small_data, max_samples=6), load_tokenizer("bert-tiny", 32), "cross")
    part = subset(data, [4, 1])
    assert part.columns[0].ids == [data.columns[0].ids[4], data.columns[0].ids[1]]
    assert part.columns[0].type_ids == [data.columns[0].type_ids[4], data.columns[0].type_ids[1]]


@pytest.mark.slow
def test_torchrun_two_processes_cross_with_smart_train_like_one(small_data, tmp_path_factory):
    """Two gloo processes against one on the same global batch (tests/test_distributed.py's harness): SMART's
    noise for the joint sequence's single column (distributed.batch_noise) and sharded prediction."""
    import torch.multiprocessing as mp

    import minbert.training.run as train  # build_model lives in minbert.training.run

    from .test_distributed import PER_DEVICE, WORLD, _worker, common, free_port, losses, weights, without_dropout

    flags = ["--combiner", "gse", "--max_train_samples", "21", "--pair_encoding", "cross", "--smart",
             "--smart_sigma", "0.1", "--smart_epsilon", "0.5", "--smart_eta", "0.1"]
    root = tmp_path_factory.mktemp("cross-ddp")
    single, double, dump = root / "single", root / "double", root / "dump"
    dump.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    build = train.build_model
    train.build_model = without_dropout(build)
    try:
        assert train_main(common(small_data, single, PER_DEVICE * WORLD) + flags) == 0
    finally:
        train.build_model = build
        torch.set_num_threads(threads)
    jobs = [("cross", common(small_data, double, PER_DEVICE) + flags),
            ("predict", ["--predict_only", "--checkpoint", str(single / "best"), "--data_dir", str(small_data),
                         "--output_dir", str(root / "predict"), "--max_eval_samples", "12",
                         "--per_device_eval_batch_size", "4", "--device", "cpu", "--bf16", "off"])]
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(jobs, free_port(), str(double), str(dump)), nprocs=WORLD, join=True)
    one, two = weights(single / "last"), weights(double / "last")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for e, g in zip(losses(single), losses(double), strict=True):
        assert g == pytest.approx(e, rel=1e-5)
    for name in SIX:
        assert (root / "predict" / "predictions" / name).read_text() == (single / "predictions" / name).read_text()
