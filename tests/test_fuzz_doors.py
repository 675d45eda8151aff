"""Seeded fuzz of the input doors of issue 22: every JSON a user writes (a --config file, --combiner_args,
--optim_args) is read strictly by minbert.io.parse_json, every list flag by minbert.io.comma_list; evaluate.py's
overall exists only over SST, QQP and STS; --ci needs 2 rows and warns below MIN_RELIABLE; a user combiner with
the wrong interface is one line, before training or at its first step, and leaves nothing behind."""
from __future__ import annotations

import json
import random

import pytest

from minbert.cli import evaluate_main, evaluate_parser, train_main
from minbert.io import DataError, comma_list, parse_json
from minbert.methods.optim import parse_optim_args
from minbert.tasks.data import DEFAULT_TASKS, TASKS, load_task
from minbert.tasks.metrics import with_overall
from minbert.tasks.predict import prediction_path, write_predictions
from minbert.tasks.significance import MIN_RELIABLE

from .conftest import ROOT
from .test_cli_errors import usage_error

SEED = 20261203
VALID = ['{"lr": 1e-4, "num_grads": 4}', '{"a": [1, 2, {"b": null}], "c": "x"}', '{"init_log_variance": 2.0}']


def _malformed(rng: random.Random) -> str:
    text = rng.choice(VALID)
    kind = rng.randrange(4)
    if kind == 0:  # cut anywhere inside: an unbalanced brace or bracket, a torn string
        return text[: rng.randrange(1, len(text) - 1)]
    if kind == 1:  # trailing garbage
        return text + rng.choice([" x", "}", ",", " {}", "]"])
    if kind == 2:  # a key given twice
        key = json.loads(text).popitem()[0]
        return text[:-1] + f', "{key}": 0}}'
    return rng.choice(["{", "}", "{{}", '{"a": 1,}', "{'a': 1}", '{"a": NaN}', '{"a": Infinity}'])


@pytest.mark.parametrize("case", range(30))
def test_parse_json_refuses_malformed_text_in_one_line(case):
    rng = random.Random(SEED + case)
    text = _malformed(rng)
    with pytest.raises(DataError) as e:
        parse_json(text, "--flag")
    assert str(e.value).startswith("--flag") and "invalid JSON" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", range(24))
def test_every_json_flag_refuses_malformed_text(case, capsys, tmp_path):
    rng = random.Random(SEED + 1000 + case)
    text = _malformed(rng)
    flag = ["--optim_args", "--combiner_args"][case % 2]
    if flag == "--optim_args":
        if text.startswith("{") and text.endswith("}") and "NaN" not in text and "Infinity" not in text:
            try:  # '{lr: 1}'-style bodies are the cards' key: value form, also read strictly
                parse_optim_args(text)
            except ValueError:
                pass
            else:
                pytest.skip("a valid key: value body")
        argv = ["--data_dir", str(ROOT / "data"), "--optim", "mfac", "--optim_args", text]
    else:
        argv = ["--data_dir", str(ROOT / "data"), "--combiner", "tests.test_user_combiner:Recording",
                "--trust_combiner_code", "--combiner_args", text]
    message = usage_error(train_main, argv, capsys)
    assert message.startswith(flag), message


@pytest.mark.parametrize("text", ["{", "{lr: 1e-4", "lr: 1e-4}", "lr: (0.9, 0.99", "lr: 1e-4,", "lr: 1, lr: 2",
                                  '{"lr": 1, "lr": 2}', '{"lr": 1} x', "lr:: 3", ",lr: 1"])
def test_optim_args_malformed_is_never_fewer_arguments(text):
    with pytest.raises(ValueError):
        parse_optim_args(text)


def test_a_config_file_with_a_duplicate_key_or_trailing_text_is_one_line(tmp_path, capsys):
    for i, text in enumerate(['{"seed": 1, "seed": 2}', '{"seed": 1} {"seed": 2}', '{"seed": 1']):
        path = tmp_path / f"c{i}.json"
        path.write_text(text)
        with pytest.raises(SystemExit) as e:
            train_main(["--config", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --config {path}")


@pytest.mark.parametrize("case", range(16))
def test_comma_list_refuses_empty_and_repeated_items(case):
    rng = random.Random(SEED + 2000 + case)
    items = rng.sample(["sst", "qqp", "sts", "a", "b"], rng.randint(1, 4))
    assert comma_list(" , ".join(items), "--x") == items
    bad = list(items)
    where = rng.randrange(len(bad) + 1)
    bad.insert(where, rng.choice(["", " ", rng.choice(items)]))
    with pytest.raises(ValueError) as e:
        comma_list(",".join(bad), "--x")
    assert str(e.value).startswith("--x")


# ------------------------------------------------------------------------------------------ evaluate.py
def _predictions(data_dir, out, tasks, rows=None):
    for task in tasks:
        data = load_task(task, "dev", data_dir)
        examples = data.examples[:rows] if rows else data.examples
        values = [ex.label for ex in examples]
        if task == "sts":
            values = [(v + i % 3) % 5.0 for i, v in enumerate(values)]
        write_predictions(prediction_path(out, task, "dev"), TASKS[task], [ex.id for ex in examples], values)


@pytest.mark.parametrize("case", range(8))
def test_overall_only_when_all_three_tasks_are_scored(case, small_data, tmp_path, capsys):
    rng = random.Random(SEED + 3000 + case)
    tasks = rng.sample(list(DEFAULT_TASKS), rng.randint(1, 3))
    _predictions(small_data, tmp_path, tasks)
    assert evaluate_main(["--predictions", str(tmp_path), "--data_dir", str(small_data), "--json", "--ci"]) == 0
    out = json.loads(capsys.readouterr().out)
    full = set(tasks) == set(DEFAULT_TASKS)
    assert ("overall" in out["dev"]) == full and ("overall" in out["dev_ci"]) == full
    assert evaluate_main(["--predictions", str(tmp_path), "--data_dir", str(small_data)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[2].rstrip().endswith("| - |") != full


def test_with_overall_and_the_help_say_the_same():
    assert "overall" not in with_overall({"sst": 0.5, "sts": 0.2})
    assert with_overall({"sst": 0.5, "qqp": 0.5, "sts": 0.0})["overall"] == pytest.approx(0.5)
    text = " ".join(evaluate_parser().format_help().split())
    assert "only when SST, QQP and STS are all scored" in text and f"below {MIN_RELIABLE}" in text


def test_ci_refuses_one_row_and_warns_below_the_minimum(small_data, data_copy, tmp_path, capsys):
    for name in ("one", "few"):
        (tmp_path / name).mkdir()
    _predictions(small_data, tmp_path / "one", ["sst"], rows=1)
    rc = evaluate_main(["--predictions", str(tmp_path / "one"), "--data_dir", str(small_data), "--allow_partial",
                        "--ci"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == ("error: --ci: sst dev has 1 scored example(s); a bootstrap interval needs at least "
                                   f"2 (and {MIN_RELIABLE} to mean much)")
    _predictions(small_data, tmp_path / "few", ["sst"], rows=3)
    rc = evaluate_main(["--predictions", str(tmp_path / "few"), "--data_dir", str(small_data), "--allow_partial",
                        "--ci"])
    err = capsys.readouterr().err
    assert rc == 0 and f"warning: --ci: sst dev has only 3 scored examples; below {MIN_RELIABLE}" in err


# ------------------------------------------------------------------------------------------ user combiners
class TwoArguments:
    def step(self, ctx, extra):
        return {}


class NoArgument:
    def step(self):
        return {}


class ReturnsNone:
    def step(self, ctx):
        from minbert.methods.combiners import Sum

        Sum().step(ctx)


class CallsExit:
    def step(self, ctx):
        raise SystemExit(3)


class WrongLoss:
    def step(self, ctx):
        return {"mnli": 1.0}


def _tiny(data_dir, out, combiner):
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "8", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
            "--max_steps_per_epoch", "1", "--max_eval_samples", "8", "--max_seq_length", "16", "--device", "cpu",
            "--combiner", f"{__name__}:{combiner}", "--trust_combiner_code"]


@pytest.mark.parametrize("combiner", ["TwoArguments", "NoArgument"])
def test_a_step_with_the_wrong_signature_is_refused_before_training(combiner, small_data, tmp_path, capsys):
    message = usage_error(train_main, _tiny(small_data, tmp_path / "out", combiner), capsys)
    assert message.startswith(f"--combiner {__name__}:{combiner}: step") and "cannot be called as step(ctx)" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("combiner,said", [("ReturnsNone", "step(ctx) returned NoneType, expected a dict"),
                                           ("CallsExit", "step(ctx) called sys.exit(3)"),
                                           ("WrongLoss", "step(ctx) returned a loss for 'mnli', which is not a task")])
def test_a_step_that_misbehaves_is_one_line_and_the_same_command_starts_again(combiner, said, small_data, tmp_path,
                                                                               capsys, one_thread):
    out = tmp_path / "out"
    argv = _tiny(small_data, out, combiner)
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: --combiner {__name__}:{combiner}: {said}" in err and "Traceback" not in err
    assert not out.exists()  # created by the run, which wrote nothing that lasts: gone
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train_main(argv) == 1  # the same command again: the same error, not "holds an unfinished run"
    assert said in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
