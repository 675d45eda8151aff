"""The M-FAC model cards' comparison (../shared/seeds cards; Frantar, Kurtic, Alistarh 2021): Adam vs M-FAC.

    python -m minbert.experiments mfac --setting sst2 --profile quick        # (a) SST-2, single task
    python -m minbert.experiments mfac --setting multitask --profile quick   # (b) the three CS224N tasks

Five seeds each, mean ± std, and the paired difference M-FAC − Adam over the same seeds with a 95% t-interval.
The cards fine-tune BERT-mini with HF run_glue and swap only the optimizer: batch 32, learning rate 1e-4, max
length 128, linear decay without warmup or weight decay (run_glue's defaults), M-FAC with num_grads 1024 and
damp 1e-6.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from minbert.experiments.profiles import Row
from minbert.experiments.runner import is_finished, run_row
from minbert.experiments.stats import mean_std, paired_difference
from minbert.experiments.tables import cards_markdown
from minbert.io import atomic_write_text, finite_or_null, json_text

CARD_SEEDS = (1234, 1235, 1236, 1237, 1238)  # the SST-2 card's seed, then the next four
# num_grads 1024 over all 22.7M parameters of the embedded encoder needs 93 GB as a dense window: stored top-1%
# sparse with error feedback (Modoranu et al. 2023) it needs 1.9 GB (docs/mfac.md).
CARD_MFAC_ARGS = '{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6, "sparsity_k": 0.01}'
CARD_OPTIMIZERS = {"adam": ("--optim", "adamw"), "mfac": ("--optim", "mfac", "--optim_args", CARD_MFAC_ARGS)}

CARD_SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # (a) SST-2 single task, as on the SST-2 card: the pooler output of [CLS] into a linear layer, one learning rate.
    "sst2": {
        "common": ("--tasks", "sst2", "--model_name_or_path", "minilm-l6", "--pooling", "cls",
                   "--learning_rate", "1e-4", "--head_learning_rate", "1e-4", "--per_device_train_batch_size", "32",
                   "--max_seq_length", "128", "--weight_decay", "0", "--warmup_ratio", "0", "--skip_bad_rows"),
        "full": ("--num_train_epochs", "3"),
        "quick": ("--num_train_epochs", "1"),
        "smoke": ("--model_name_or_path", "bert-tiny", "--max_train_samples", "32", "--max_eval_samples", "16",
                  "--per_device_train_batch_size", "8", "--num_train_epochs", "1"),
    },
    # (b) the multitask benchmark: the main job's model (train_multitask.py's defaults) with one step on the summed loss, so each
    # M-FAC window row is one full multitask gradient.
    "multitask": {
        "common": ("--model_name_or_path", "minilm-l6", "--combiner", "sum", "--learning_rate", "1e-4",
                   "--per_device_train_batch_size", "32", "--skip_bad_rows"),
        "full": ("--num_train_epochs", "3"),
        "quick": ("--num_train_epochs", "1", "--max_steps_per_epoch", "60", "--max_eval_samples", "1000"),
        "smoke": ("--model_name_or_path", "bert-tiny", "--max_train_samples", "32", "--max_eval_samples", "16",
                  "--per_device_train_batch_size", "8", "--num_train_epochs", "1"),
    },
}
CARD_PROFILES = ("full", "quick", "smoke")


def card_rows(setting: str, profile: str, seeds: tuple[int, ...]) -> tuple[Row, ...]:
    flags = CARD_SETTINGS[setting]["common"] + CARD_SETTINGS[setting][profile]
    return tuple(Row(f"{opt}-seed{seed}", f"{opt} seed {seed}", flags + opt_flags + ("--seed", str(seed)), None)
                 for seed in seeds for opt, opt_flags in CARD_OPTIMIZERS.items())


@dataclass
class CardsRun:
    setting: str
    profile: str
    output_dir: Path
    seeds: tuple[int, ...] = CARD_SEEDS
    data_dir: str = "data"
    device: str = "auto"
    overwrite: bool = False
    collect_only: bool = False  # read the finished runs back and write the table; train nothing
    results: list[dict] = field(default_factory=list)

    def commands(self) -> list[tuple[Row, int, list[str]]]:
        out = []
        for row in card_rows(self.setting, self.profile, self.seeds):
            argv = [*row.flags, "--data_dir", self.data_dir, "--output_dir", str(self.output_dir / row.key),
                    "--device", self.device]
            out.append((row, int(row.key.split("-seed")[1]), argv))
        return out

    def run(self) -> list[dict]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results = []
        for row, seed, argv in self.commands():
            if self.collect_only and not is_finished(argv):
                continue
            outcome = run_row(row, argv, self.overwrite)
            self.results.append({"key": row.key, "optimizer": row.key.split("-seed")[0], "seed": seed,
                                 "command": "python train_multitask.py " + shlex.join(argv), **outcome})
            self.write()
        return self.results

    def _finished(self, optimizer: str) -> list[dict]:
        return [r for r in self.results if r["optimizer"] == optimizer and r.get("dev")]

    def summary(self) -> dict[str, dict[str, tuple[float, float | None, int]]]:
        """{optimizer: {metric: (mean, std, runs)}} over the finished runs."""
        out = {}
        for opt in CARD_OPTIMIZERS:
            runs = [r["dev"] for r in self._finished(opt)]
            if runs:
                keys = [k for k in runs[0] if not (k == "overall" and len(runs[0]) == 2)]  # one task: overall = it
                out[opt] = {k: (*mean_std([d[k] for d in runs]), len(runs)) for k in keys}
        return out

    def paired(self) -> dict[str, dict | None]:
        """{metric: M-FAC − Adam paired over the seeds where both finished (stats.paired_difference)}."""
        adam, mfac = self._finished("adam"), self._finished("mfac")
        metrics = [k for k in (adam or mfac or [{"dev": {}}])[0]["dev"]]
        return {k: paired_difference({r["seed"]: r["dev"][k] for r in mfac if k in r["dev"]},
                                     {r["seed"]: r["dev"][k] for r in adam if k in r["dev"]}) for k in metrics}

    def paired_metric(self) -> str | None:
        """The score of the paired line: the overall score, or the one task's score when there is one task."""
        summary = self.summary()
        if not summary:
            return None
        keys = list(next(iter(summary.values())))
        return "overall" if "overall" in keys else keys[0]

    def table(self) -> str:
        walls = {opt: [r["wall_seconds"] for r in self._finished(opt) if r.get("wall_seconds") is not None]
                 for opt in CARD_OPTIMIZERS}
        return cards_markdown(self.summary(), walls, self.paired(), self.paired_metric())

    def write(self) -> None:
        header = (f"# Adam vs M-FAC, setting `{self.setting}`, profile `{self.profile}`\n\n"
                  f"Mean ± sample std over seeds {', '.join(map(str, self.seeds))} (STS is Pearson r x 100).\n\n")
        atomic_write_text(self.output_dir / "results.md", header + self.table() + "\n")
        payload = {"experiment": "mfac", "setting": self.setting, "profile": self.profile,
                   "flags": list(CARD_SETTINGS[self.setting]["common"] + CARD_SETTINGS[self.setting][self.profile]),
                   "optimizers": {k: list(v) for k, v in CARD_OPTIMIZERS.items()},
                   "summary": {o: {k: {"mean": m, "std": s, "runs": n} for k, (m, s, n) in st.items()}
                               for o, st in self.summary().items()},
                   "paired": {"difference": "mfac - adam", "metric": self.paired_metric(), "scores": self.paired()},
                   "runs": self.results}
        atomic_write_text(self.output_dir / "results.json", json_text(finite_or_null(payload)) + "\n")
