"""Which recorded keys a ``--config FILE.json`` may carry (the decision of issue 22, documented in docs/training.md).

A run's args.json records every flag, so that it can be reused with ``--config``. Three of them are decisions
about one invocation, not settings of a run, and reusing them would let a shared or copied file act for the user:

* ``overwrite_output_dir``: true in a run's args.json would delete that run (its ``output_dir`` is recorded too)
  when the file is reused with one flag changed;
* ``resume``: continuing a run is a choice made at the command line, with the run's own flags;
* ``trust_combiner_code``: importing code named by ``--combiner package.module:Class`` must be asked for by the
  person running the command, never by a file (as ``trust_remote_code`` in Hugging Face).

These keys are accepted in a config file (args.json holds them) but ignored, with a one-line note on stderr when
the file sets one of them to true. ``config`` (the file a run was itself read from) is ignored silently. Every
other flag may come from a config file; flags on the command line override it.
"""
from __future__ import annotations

import argparse
import json
import sys

from minbert.io import read_json_file
from minbert.io.settings import nonneg_float, nonneg_int, positive_int
from minbert.training.precision import bf16_flag

# Keys a config file may hold but that only the command line can set (see the module docstring).
COMMAND_LINE_ONLY = ("overwrite_output_dir", "resume", "trust_combiner_code")
# Keys a config file may hold that mean nothing there.
IGNORED = ("config",)


def settable_values(values: dict, path: str) -> dict:
    """The entries of a config file's JSON object that may set flags: ``values`` without the COMMAND_LINE_ONLY
    and IGNORED keys. A COMMAND_LINE_ONLY key set to true gets one note naming the file and the key; one that is not
    true or false is a ValueError (as for the flag itself)."""
    for key in COMMAND_LINE_ONLY:  # still the flag's type: a run's args.json records false (or true)
        if key in values and not isinstance(values[key], bool):
            raise ValueError(f"{path}: {key}: expected true or false, got {json.dumps(values[key])}")
    dropped = [key for key in COMMAND_LINE_ONLY if values.get(key) is True]
    if dropped:
        print(f"note: {path}: {', '.join(dropped)} ignored (a config file cannot set "
              f"{'it' if len(dropped) == 1 else 'them'}; give {' '.join('--' + k for k in dropped)} on the "
              "command line)", file=sys.stderr)
    return {k: v for k, v in values.items() if k not in COMMAND_LINE_ONLY and k not in IGNORED}


def apply_config_file(p: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, str]:
    """``--config FILE.json``: its keys (flag names without dashes) become the parser's defaults, so flags on
    the command line still win. Each value must have its flag's JSON type and goes through its flag's own type
    and choices checks; a null is kept for RunConfig.validate (allowed where the flag's default is null). A
    run's args.json is a valid config file; minbert.training.config_file decides which of its keys are used (not
    ``overwrite_output_dir``, ``resume``, ``trust_combiner_code``, ``config``).
    Returns {key: FILE} for the keys the file set and the command line did not."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return {}

    def fail(msg: str):
        p.exit(2, f"error: {msg}\n")

    try:
        values = read_json_file(path, finite=False)  # a NaN is named with its key below; a FIFO is refused at once
    except ValueError as e:  # DataError: one line naming the file (and line)
        fail(f"--config {e}")
    if not isinstance(values, dict):
        fail(f"--config {path}: expected a JSON object of flag names and values")
    actions = {a.dest: a for a in p._actions if a.option_strings and a.dest not in ("help", "config")}
    defaults = {}
    try:
        values = settable_values(values, path)  # overwrite_output_dir, resume...: the command line's only
    except ValueError as e:
        fail(str(e))
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            fail(f"{path}: unknown key {key!r} (not a flag of {p.prog})")
        if action.nargs == 0:  # an on/off flag (store_true)
            if not isinstance(value, bool):
                fail(f"{path}: {key}: expected true or false, got {json.dumps(value)}")
            defaults[key] = value
            continue
        if value is None or (key == "task_spec" and isinstance(value, dict)):  # args.json: the spec's content,
            defaults[key] = value                                               # checked by RunConfig.validate
            continue
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)  # the flag takes several words
        expected = _json_type_problem(action, value, many)
        if expected:
            fail(f"{path}: {key}: expected {expected}, got {json.dumps(value)}")
        if many:
            texts = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        else:  # a list for a one-word flag is its comma-separated form (--tasks sst,qqp)
            texts = [",".join(map(str, value)) if isinstance(value, list) else str(value)]
        converted = []
        for text in texts:
            try:
                converted.append(action.type(text) if action.type else text)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                fail(f"{path}: {key}: {e}")
            if action.choices is not None and converted[-1] not in action.choices:
                fail(f"{path}: {key}: {converted[-1]!r} is not one of {', '.join(map(str, action.choices))}")
        defaults[key] = converted if many else converted[0]
    p.set_defaults(**defaults)
    given = _given_on_command_line(p, argv)
    return {key: path for key in defaults if key not in given}


def _json_type_problem(action: argparse.Action, value, many: bool) -> str | None:
    """What a config value should have been, if its JSON type does not suit the flag (None if it does)."""
    if action.type in (int, float, positive_int, nonneg_int, nonneg_float):
        ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        return None if ok else "a number"
    scalar_ok = isinstance(value, str) or (action.type is bf16_flag and isinstance(value, bool))  # older args.json
    if many or action.dest == "tasks":  # several words, or a list for a comma-separated flag
        ok = scalar_ok or (isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                           for v in value))
        return None if ok else "a string or a list of strings"
    return None if scalar_ok else "a string"


def _given_on_command_line(p: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The flags the command line itself sets (the parse that counts has already succeeded)."""
    actions = [a for a in p._actions if a.dest != "help"]
    saved = [a.default for a in actions], dict(p._defaults)
    for a in actions:
        a.default = argparse.SUPPRESS
    p._defaults.clear()
    try:
        return set(vars(p.parse_known_args(argv)[0]))
    finally:
        for a, default in zip(actions, saved[0]):
            a.default = default
        p._defaults.update(saved[1])
