"""python -m minbert.plot draws metrics.jsonl curves and experiment tables; --report_to tensorboard logs scalars."""
import json
import struct
import sys

import pytest

from minbert.plot import curves, main as plot_main, read_experiment_rows, read_metrics
from minbert.training.metrics_log import MetricsLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(directory, epochs=2, steps_per_epoch=4, lr=1e-4):
    """metrics.jsonl as the training loop writes it: a record per logged step, one per epoch, a final one."""
    directory.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(directory / "metrics.jsonl")
    for epoch in range(1, epochs + 1):
        for s in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + s + 1
            log.write(step=step, epoch=epoch, loss_sst=1.6 / step, loss_qqp=0.7 / step, loss_sts=4.0 / step,
                      lr=lr * (1 - step / (epochs * steps_per_epoch)), examples_per_s=100.0, bad_steps=0)
        dev = {"sst": 0.3 + 0.1 * epoch, "qqp": 0.6 + 0.05 * epoch, "sts": 0.2 * epoch}
        dev["overall"] = (dev["sst"] + dev["qqp"] + (dev["sts"] + 1) / 2) / 3
        log.write(epoch=epoch, step=epoch * steps_per_epoch, dev=dev, best=True, epoch_seconds=1.0)
    log.write(final=True, dev=dev, wall_seconds=3.0)
    log.close()
    return directory


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_curves_read_from_metrics_jsonl(tmp_path):
    c = curves(read_metrics(write_run(tmp_path / "run")))
    assert list(c["train"]) == ["loss_sst", "loss_qqp", "loss_sts", "lr"]
    assert c["train"]["loss_sts"][0] == list(range(1, 9))
    assert list(c["dev"]) == ["sst", "qqp", "sts", "overall"]
    assert c["dev"]["sts"] == ([1, 2], [0.2, 0.4])


def test_read_metrics_follows_a_resumed_run(tmp_path):
    """A killed run logged steps 1..6 but saved at step 4; the resume logs 5.. again: one curve, no repeats."""
    lines = [{"step": s, "epoch": 1, "loss_sst": 1.0} for s in range(1, 7)]
    lines += [{"resumed_from_step": 4, "epoch": 1}]
    lines += [{"step": s, "epoch": 1, "loss_sst": 0.5} for s in range(5, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    steps, losses = curves(read_metrics(tmp_path))["train"]["loss_sst"]
    assert steps == list(range(1, 9)) and losses == [1.0] * 4 + [0.5] * 4


def test_read_metrics_reports_bad_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(tmp_path)


def test_plot_runs_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = write_run(tmp_path / "baseline"), write_run(tmp_path / "pcgrad", epochs=3, lr=2e-4)
    out = tmp_path / "curves.png"
    assert plot_main([str(a), str(b), "--out", str(out)]) == 0
    width, height = png_size(out)
    assert width > 400 and height > 300


def test_plot_experiments_writes_a_png_and_skips_rows_without_scores(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"name": "individual", "sst": 0.5, "qqp": 0.8, "sts": 0.8, "overall": 0.7667},
            {"name": "pcgrad", "dev": {"overall": 0.7801}, "report": {"overall": 0.754}},
            {"name": "crashed", "error": "non-finite loss"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    assert [r[:3] for r in read_experiment_rows(path)] == [("individual", 0.7667, None), ("pcgrad", 0.7801, 0.754)]
    assert all(r.std is None and r.runs == 1 for r in read_experiment_rows(path))  # single runs: no spread
    wrapped = tmp_path / "wrapped.json"  # the layout of python -m minbert.experiments: rows under "rows"
    wrapped.write_text(json.dumps({"experiment": "paper", "rows": rows}))
    assert read_experiment_rows(wrapped) == read_experiment_rows(path)
    out = tmp_path / "bars.png"
    assert plot_main(["--experiments", str(path), "--out", str(out)]) == 0
    assert png_size(out)[0] > 0


def _capture_figure(monkeypatch):
    """The Figure that plot_experiments saves (it is written with savefig and then dropped)."""
    from minbert import plot

    figures = []
    save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, out: figures.append(fig) or save(fig, out))
    return figures


def test_plot_experiments_draws_std_over_seeds_as_error_bars(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    # the layout python -m minbert.experiments paper --seeds 1,2,3 writes (every run kept, plus the aggregates)
    runs = lambda *overall: [{"seed": s, "dev": {"overall": o}} for s, o in zip((1, 2, 3), overall)]  # noqa: E731
    rows = [{"key": "baseline", "name": "Baseline", "runs": runs(0.70, 0.72, 0.74), "n_runs": 3,
             "dev": {"overall": 0.72}, "std": {"overall": 0.02}, "report": {"overall": 0.641}},
            {"key": "multitask", "name": "Multitask Learning", "runs": runs(0.69, 0.70, 0.71), "n_runs": 3,
             "dev": {"overall": 0.70}, "std": {"overall": 0.01}, "report": {"overall": 0.636}},
            {"key": "smart_gse", "name": "SMART Loss w/ GSE", "runs": runs(0.7), "n_runs": 1,
             "dev": {"overall": 0.7}, "std": {"overall": None}, "report": None}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"experiment": "paper", "seeds": [1, 2, 3], "rows": rows}))
    read = read_experiment_rows(path)
    assert [(r.name, r.overall, r.std, r.runs) for r in read] == [
        ("Baseline", 0.72, 0.02, 3), ("Multitask Learning", 0.70, 0.01, 3), ("SMART Loss w/ GSE", 0.7, None, 1)]
    figures = _capture_figure(monkeypatch)
    out = tmp_path / "bars.png"
    assert plot_main(["--experiments", str(path), "--out", str(out)]) == 0
    assert png_size(out)[0] > 0
    from matplotlib.container import BarContainer

    bars = next(c for c in figures[0].axes[0].containers if isinstance(c, BarContainer))
    assert bars.errorbar is not None  # one horizontal error bar per row: mean ± std
    segments = bars.errorbar.lines[2][0].get_segments()
    half_widths = [(seg[1][0] - seg[0][0]) / 2 for seg in segments]
    assert half_widths == pytest.approx([0.02, 0.01, 0.0])

    # an old single-seed file draws no error bars
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"rows": [{"name": "Baseline", "dev": {"overall": 0.5}, "report": None}]}))
    assert plot_main(["--experiments", str(single), "--out", str(tmp_path / "one.png")]) == 0
    bars = next(c for c in figures[1].axes[0].containers if isinstance(c, BarContainer))
    assert bars.errorbar is None


def test_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert plot_main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 1
    (tmp_path / "e.json").write_text('[{"name": "a"}]')
    assert plot_main(["--experiments", str(tmp_path / "e.json"), "--out", str(tmp_path / "x.png")]) == 1
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert plot_main([str(write_run(tmp_path / "run")), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "no such file" in err[0] and "no row has a name and a numeric overall" in err[1]
    assert "pip install matplotlib" in err[2]
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------- TensorBoard


def test_report_to_tensorboard_without_the_package_is_one_line_before_training(tmp_path, small_data, capsys, monkeypatch):
    from minbert.cli import train_main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "run"
    rc = train_main(["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data), "--output_dir", str(out),
                     "--report_to", "tensorboard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("error: ") and "pip install tensorboard" in err[0]
    assert not out.exists()  # nothing was started


def test_report_to_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", report_to="tensorboard")
    log.write(step=1, epoch=1, loss_sst=1.5, lr=1e-4)
    log.write(step=2, epoch=1, loss_sst=1.25, lr=5e-5)
    log.write(epoch=1, step=2, dev={"sst": 0.4, "overall": 0.45}, best=True)
    log.close()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss_sst", "lr", "dev/sst", "dev/overall"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("loss_sst")] == [(1, 1.5), (2, 1.25)]
    assert len(read_metrics(tmp_path)) == 3  # metrics.jsonl is written as before
