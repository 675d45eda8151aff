"""``python -m minbert.experiments mtl`` (minbert.experiments.mtl): every combiner as a row on the Baseline's
settings, paired differences against Baseline and against sum; run on the smoke profile with a few rows."""
from __future__ import annotations

import json

import pytest

from minbert.experiments import main
from minbert.experiments.mtl import MTL_ITERATIONS, MTL_ROW_KEYS
from minbert.methods.mtl_methods import METHODS


def test_smoke_mtl_table_compares_every_row_with_baseline_and_sum(small_data, tmp_path, capsys, one_thread):
    out = tmp_path / "mtl"
    assert main(["mtl", "--profile", "smoke", "--seeds", "1,2", "--rows", "baseline,sum,upgrad,uw",
                 "--data_dir", str(small_data), "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "mtl" and results["second_reference"] == "sum"
    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "sum", "upgrad", "uw"]
    for key, row in rows.items():
        assert row["n_runs"] == 2 and row["error"] is None, key
        assert all(f"--iterations_multiplier {MTL_ITERATIONS} " in r["command"] for r in row["runs"])
    d = rows["upgrad"]["vs_sum"]
    per_seed = [u["dev"]["overall"] - s["dev"]["overall"] for u, s in zip(rows["upgrad"]["runs"], rows["sum"]["runs"])]
    assert d["seeds"] == [1, 2] and d["diff"] == pytest.approx(sum(per_seed) / 2)
    assert rows["sum"]["vs_sum"] is None and rows["sum"]["vs_baseline"] is not None
    for row in rows.values():  # each run's peak memory, recorded by the run (results.json) and kept by the table
        peaks = [json.loads((out / row["key"] / f"seed{s}" / "results.json").read_text())["peak_rss_mb"] for s in (1, 2)]
        assert all(p > 50 for p in peaks) and row["peak_rss_mb"] == max(r["peak_rss_mb"] for r in row["runs"])
    table = (out / "results.md").read_text()
    assert "Δ overall vs sum [95% CI] | wall s | peak RSS MB |" in table and table.count("(reference)") == 2
    assert f"| {rows['uw']['peak_rss_mb']:.0f} |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| Baseline (individual) | 2/2 | " in capsys.readouterr().out


def test_rows_are_every_combiner_and_unknown_rows_are_refused(small_data, capsys):
    assert set(MTL_ROW_KEYS) == {"baseline", "sum", "pcgrad", "gse", *METHODS}  # the solvers are installed here
    assert main(["mtl", "--profile", "cpu", "--seeds", "1,2,3", "--data_dir", str(small_data),
                 "--print_commands"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\npython train_multitask.py ") + printed.startswith("python") == 3 * len(MTL_ROW_KEYS)
    assert "--combiner cagrad --combiner_args '{\"c\": 0.4}'" in printed
    with pytest.raises(SystemExit):
        main(["mtl", "--rows", "baseline,nope", "--data_dir", str(small_data)])
    assert "--rows: unknown row 'nope'" in capsys.readouterr().err
