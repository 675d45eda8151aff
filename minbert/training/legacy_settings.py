"""What an older minbert wrote to args.json, read as today's settings: --config and --resume read old runs
through :func:`current_settings`, so an old run's args.json loads and resumes with the behaviour it was trained
with."""
from __future__ import annotations

from minbert.methods.smart import LEGACY_PROJECTIONS

# Values an older minbert wrote to args.json -> their current names.
LEGACY_SETTINGS: dict[str, dict[str, str]] = {"smart_projection": LEGACY_PROJECTIONS}


# What a run got for a flag its args.json lacks (written before the flag existed), from its other settings:
# --combiner pcgrad stepped on the PCGrad sum, gse on the mean, before --pcgrad_reduction.
LEGACY_DEFAULTS = {"pcgrad_reduction": lambda saved: "sum" if saved.get("combiner") == "pcgrad" else "mean"}


def current_settings(values: dict, saved: bool = False) -> dict:
    """``values`` (flag -> value, e.g. an args.json) with legacy values renamed (:data:`LEGACY_SETTINGS`);
    ``saved``: an args.json, whose missing flags get what that run used (:data:`LEGACY_DEFAULTS`)."""
    out = dict(values)
    for key, renames in LEGACY_SETTINGS.items():
        if isinstance(out.get(key), str):
            out[key] = renames.get(out[key], out[key])
    if saved:
        out.update({key: old(out) for key, old in LEGACY_DEFAULTS.items() if key not in out})
    return out
