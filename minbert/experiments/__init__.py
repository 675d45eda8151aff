"""Re-run the CS224N report's dev table (Cortes, Hsieh, Fu: "An Exploration of Fine-Tuning Techniques on minBERT
Optimizations", §5.4) and the M-FAC cards' Adam vs M-FAC comparison through the normal training path, over seeds.

    python -m minbert.experiments paper --profile cpu --seeds 1,2,3 --output_dir runs/paper-cpu
    python -m minbert.experiments mfac --setting sst2 --profile quick

Each row of a table is a set of train_multitask.py flags, run once per seed in its own folder
(``OUTPUT_DIR/<row>/seed<S>``). The table gives every score as mean ± sample std over the seeds beside the
report's number, and every row's paired difference in overall score against Baseline (same seeds) with a 95%
t-interval; results.json keeps every run's scores. Finished runs are read back, interrupted ones resumed, so an
interrupted table is continued by starting the same command again. ``--print_commands`` prints every run's
train_multitask.py command without running anything.

Modules: :mod:`.profiles` (the rows and the profiles: what each keeps from the report), :mod:`.runner` (running
the rows, collecting the scores), :mod:`.stats` (mean ± std, paired differences), :mod:`.tables` (Markdown),
:mod:`.cards` (Adam vs M-FAC), :mod:`.command` (the command line).
"""
from minbert.experiments.cards import CARD_MFAC_ARGS, CARD_SEEDS, CARD_SETTINGS, CardsRun, card_rows
from minbert.experiments.command import main, parser
from minbert.experiments.profiles import (ARCHITECTURES, BASELINE, COMMON, CPU_STEPS, DEFAULT_ARCHITECTURE,
                                          PAIR_ENCODING, PROFILES, REPORT_ARCHITECTURE, ROW_KEYS, ROWS, STEP_CAPS, Row,
                                          bf16_native, row_argv, smart_accepts_bf16, use_bf16)
from minbert.experiments.runner import PaperRun, execute, run_row, train_entry_point
from minbert.experiments.stats import mean_std, paired_difference

__all__ = ["ARCHITECTURES", "BASELINE", "CARD_MFAC_ARGS", "CARD_SEEDS", "CARD_SETTINGS", "COMMON", "CPU_STEPS",
           "CardsRun", "DEFAULT_ARCHITECTURE", "PAIR_ENCODING", "PROFILES", "PaperRun", "REPORT_ARCHITECTURE",
           "ROWS", "ROW_KEYS", "Row", "STEP_CAPS", "bf16_native", "card_rows", "execute", "main", "mean_std", "paired_difference",
           "parser", "row_argv", "run_row", "smart_accepts_bf16", "train_entry_point",
           "use_bf16"]
