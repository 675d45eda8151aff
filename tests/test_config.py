"""--config FILE.json: flags from a JSON file, command-line flags win, a run's args.json round-trips."""
import json

import pytest

from minbert.cli import apply_config_file, train_main, train_parser

# Flags that name where a run writes, not what it computes.
OUTPUT_KEYS = {"output_dir", "overwrite_output_dir", "resume", "config"}


def parse(argv):
    p = train_parser()
    apply_config_file(p, argv)
    return p.parse_args(argv)


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_saved_args_json_reproduces_the_run_configuration(tmp_path, small_data):
    first = tmp_path / "first"
    argv = ["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data), "--tasks", "sst,sts",
            "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps_per_epoch", "1",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "3e-5",
            "--seed", "5", "--pooling", "cls", "--skip_bad_rows", "--output_dir", str(first)]
    assert train_main(argv) == 0
    second = tmp_path / "second"
    assert train_main(["--config", str(first / "args.json"), "--output_dir", str(second)]) == 0
    a = json.loads((first / "args.json").read_text())
    b = json.loads((second / "args.json").read_text())
    assert set(a) == set(b)
    differ = {k for k in a if a[k] != b[k]}
    assert differ <= OUTPUT_KEYS and "output_dir" in differ
    assert b["tasks"] == ["sst", "sts"] and b["learning_rate"] == 3e-5 and b["skip_bad_rows"] is True


def test_args_json_round_trips_every_kind_of_flag(tmp_path):
    """Lists (--tasks), several-word flags (--optim_args), on/off flags, None and lower-cased values."""
    argv = ["--tasks", "qqp,sst", "--optim", "MFAC", "--optim_args", "lr: 1e-4,", "num_grads: 8", "--skip_bad_rows",
            "--max_train_samples", "7", "--warmup_ratio", "0", "--device", "cpu", "--report_to", "tensorboard"]
    args = parse(argv)
    saved = write_json(tmp_path / "args.json", json.loads(json.dumps(vars(args), default=str)))  # as run() does
    again = parse(["--config", saved])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {k: v for k, v in vars(args).items() if k != "config"}
    assert again.optim_args == ["lr: 1e-4,", "num_grads: 8"] and again.tasks == ["qqp", "sst"] and again.optim == "mfac"


def test_command_line_overrides_the_config(tmp_path):
    config = write_json(tmp_path / "c.json", {"learning_rate": 0.5, "tasks": "sst", "seed": 3, "skip_bad_rows": True,
                                             "max_train_samples": None})
    args = parse(["--config", config, "--learning_rate", "0.1"])
    assert args.learning_rate == 0.1 and args.tasks == ["sst"] and args.seed == 3 and args.skip_bad_rows is True
    assert args.max_train_samples is None
    assert parse([]).learning_rate == 1e-4  # a parser without --config keeps its defaults


@pytest.mark.parametrize("content, message", [
    ({"learning_rat": 1e-4}, "unknown key 'learning_rat'"),
    ({"learning_rate": -1}, "learning_rate: must be >= 0"),
    ({"pooling": "avg"}, "pooling: 'avg' is not one of cls, mean, max"),
    ({"skip_bad_rows": "yes"}, "skip_bad_rows: expected true or false"),
    ({"tasks": ["sst", "mnli"]}, "tasks: unknown task"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_config_is_a_one_line_error_naming_file_and_key(tmp_path, capsys, content, message):
    config = write_json(tmp_path / "bad.json", content)
    with pytest.raises(SystemExit) as e:
        parse(["--config", config])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and str(tmp_path / "bad.json") in err[0] and message in err[0]


def test_unreadable_config_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{oops")
    for path in (tmp_path / "missing.json", tmp_path / "broken.json"):
        with pytest.raises(SystemExit):
            parse(["--config", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --config {path}")
        assert err[0].endswith("file not found") or "invalid JSON" in err[0], err


@pytest.mark.parametrize("content, message", [
    ({"combiner_args": "{"}, "combiner_args (column 2): invalid JSON"),
    ({"optim_args": "lr: x"}, "optim_args: lr: expected a finite number"),
    ({"learning_rate": "nan"}, "learning_rate: must be a finite number, got nan"),
    ({"smart_eta": "inf"}, "smart_eta: must be a finite number, got inf"),
])
def test_a_config_value_is_named_once_as_the_files_key(tmp_path, small_data, capsys, content, message):
    """A value a --config file set is named as FILE: key, once (not also as --key), however deep the check that
    refuses it; a non-finite number is "not finite", not "below 0"."""
    config = write_json(tmp_path / "c.json", content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_main(["--config", config, "--data_dir", str(small_data), "--output_dir", str(out),
                    "--model_name_or_path", "bert-tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    key = next(iter(content))
    assert f"{tmp_path / 'c.json'}: {message}" in err[0] and f"--{key}" not in err[0], err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------ from Python
def test_from_flags_is_the_command_lines_configuration(tmp_path):
    """RunConfig.from_flags reads flags and --config files as train_multitask.py does: the same RunConfig."""
    from minbert.cli import train_parser
    from minbert.training.config_file import apply_config_file
    from minbert.training.run_config import RunConfig

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"combiner": "pcgrad", "seed": 5, "tasks": ["sst", "sts"]}))
    argv = ["--config", str(cfg), "--seed", "9", "--optim_args", "lr: 1e-4", "--smart"]
    p = train_parser()
    from_file = apply_config_file(p, argv)
    expected = RunConfig.from_namespace(p.parse_args(argv), from_file)
    got = RunConfig.from_flags(argv)
    assert got.to_dict() == expected.to_dict() and got.from_file == expected.from_file
    assert got.multitask.combiner == "pcgrad" and got.training.seed == 9 and got.data.tasks == ["sst", "sts"]
    assert RunConfig.from_flags([]).to_dict() == RunConfig().to_dict()


@pytest.mark.parametrize("argv,message", [
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--combiner"], "argument --combiner: expected one argument"),
    (["--pooling", "sum"], "argument --pooling: invalid choice: 'sum'"),
    (["--config", "missing.json"], "--config missing.json: file not found"),
])
def test_from_flags_mistakes_are_one_line_errors_not_exits(argv, message, tmp_path, monkeypatch, capsys):
    from minbert.training.run_config import ConfigError, RunConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        RunConfig.from_flags(argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert capsys.readouterr().err == ""  # nothing printed: the caller decides


def test_from_flags_checks_values_in_validate_as_run_does(tmp_path):
    from minbert.training.run_config import ConfigError, RunConfig

    config = RunConfig.from_flags(["--warmup_ratio", "2", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="--warmup_ratio"):
        config.validate()
