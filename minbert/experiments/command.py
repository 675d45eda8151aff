"""The command line of ``python -m minbert.experiments``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from minbert.experiments.cards import CARD_PROFILES, CARD_SEEDS, CARD_SETTINGS, CardsRun
from minbert.experiments.profiles import PROFILES, ROW_KEYS, ROWS
from minbert.experiments.runner import PaperRun, execute
from minbert.io import comma_list
from minbert.training.precision import BF16_MODES, DEFAULT_BF16


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minbert.experiments",
                                description="Re-run the CS224N report's dev table (see docs/multitask.md) or the M-FAC "
                                            "cards' Adam vs M-FAC comparison (see docs/mfac.md), once per seed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", choices=["paper", "mfac", "mtl"],
                   help="paper: every row of the report's dev table (section 5.4); mfac: Adam vs M-FAC over seeds; "
                        "mtl: every --combiner, torchjd's methods included, on the Baseline's settings")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="full: the report's protocol (GPU); quick: about an hour on one CPU core, the report's "
                        "architecture; cpu: the package's default architecture, long enough for the rows to "
                        "separate (paper only; docs/results.md); smoke: under a minute")
    p.add_argument("--output_dir", default=None,
                   help="default: runs/paper-PROFILE or runs/mfac-SETTING-PROFILE; one subdirectory per run")
    p.add_argument("--data_dir", default="data", help="folder holding the CS224N task files")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--rows", default=",".join(ROW_KEYS),
                   help="paper: comma-separated subset of the rows, in table order")
    p.add_argument("--setting", choices=list(CARD_SETTINGS), default="sst2",
                   help="mfac: sst2 (single task, the SST-2 card) or multitask (the three CS224N tasks)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds; every row runs once per seed, in ROW/seedS. paper: default one run "
                        "per row with train_multitask.py's default seed, in ROW; mfac: default "
                        + ",".join(map(str, CARD_SEEDS)))
    p.add_argument("--bf16", choices=list(BF16_MODES), default=DEFAULT_BF16,
                   help="paper: bfloat16 autocast. auto: in every profile, like train_multitask.py, where the "
                        "hardware computes bf16 natively (AVX512-BF16/AMX CPU, or a GPU) and train_multitask.py accepts it (SMART rows "
                        "only if it accepts --smart --bf16); on: every row it accepts; off: float32 everywhere")
    p.add_argument("--overwrite_output_dir", action="store_true", help="re-run rows that already finished")
    p.add_argument("--collect_only", action="store_true",
                   help="train nothing: read the finished runs back and write the table (rows show how many of "
                        "their runs have finished), e.g. while other processes run the rest")
    p.add_argument("--print_commands", action="store_true",
                   help="print each row's train_multitask.py command and exit")
    return p


def parse_seeds(p: argparse.ArgumentParser, text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    from minbert.training.trainer_settings import SEED_RANGE

    try:
        items = comma_list(text, "--seeds")  # the list rule of every flag: no empty or repeated item
    except ValueError as e:
        p.error(str(e))
    try:
        seeds = tuple(int(x) for x in items)
    except ValueError:
        p.error(f"--seeds {text!r}: expected comma-separated integers")
    bad = [s for s in seeds if not SEED_RANGE[0] <= s <= SEED_RANGE[1]]
    if bad:
        p.error(f"--seeds: {bad[0]} is not a seed in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    return seeds


def check_collect_dir(p: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> None:
    """--collect_only reads runs back: a missing folder is a mistyped path, not an empty table."""
    if args.collect_only and not out.is_dir():
        p.error(f"--collect_only: {out} is not a folder of runs (check --output_dir)")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the tables and pick rows on its own
        p.error("run python -m minbert.experiments as one process, not under torchrun (the rows run one by one)")
    if args.experiment == "mtl":
        from minbert.experiments.mtl import mtl_main

        return mtl_main(p, args, parse_seeds(p, args.seeds), check_collect_dir)
    try:
        wanted = comma_list(args.rows, "--rows")
    except ValueError as e:
        p.error(str(e))
    unknown = [k for k in wanted if k not in ROW_KEYS]
    if unknown:
        p.error(f"--rows: unknown row {', '.join(map(repr, unknown))} (choose from {', '.join(ROW_KEYS)})")
    if not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir}: no such directory")
    seeds = parse_seeds(p, args.seeds)
    if args.collect_only and args.overwrite_output_dir:
        p.error("--collect_only trains nothing; it cannot be combined with --overwrite_output_dir")
    if args.experiment == "mfac":
        if args.profile not in CARD_PROFILES:
            p.error(f"--profile {args.profile}: the mfac experiment has {', '.join(CARD_PROFILES)}")
        out = Path(args.output_dir or f"runs/mfac-{args.setting}-{args.profile}")
        check_collect_dir(p, args, out)
        cards = CardsRun(args.setting, args.profile, out, seeds or CARD_SEEDS, args.data_dir, args.device,
                         args.overwrite_output_dir, args.collect_only)
        return execute(cards, args.print_commands)
    out = Path(args.output_dir or f"runs/paper-{args.profile}")
    check_collect_dir(p, args, out)
    paper = PaperRun(args.profile, out, args.data_dir, args.device,
                     tuple(r for r in ROWS if r.key in wanted), args.overwrite_output_dir, seeds, args.bf16,
                     args.collect_only)
    return execute(paper, args.print_commands)
