"""Which recorded keys a ``--config FILE.json`` may carry (the decision of issue 22, documented in README.md).

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

import json
import sys

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
