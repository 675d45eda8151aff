"""A run's metrics log: metrics.jsonl in the output directory, optionally mirrored to TensorBoard."""
from __future__ import annotations

import sys
from pathlib import Path

from minbert.io import AppendLog, finite_or_null, json_text

REPORT_TO = ("none", "tensorboard")  # --report_to's choices


class MetricsLog:
    """metrics.jsonl in the output directory: one JSON object per line, flushed as written.

    With ``report_to="tensorboard"`` every numeric field is also a TensorBoard scalar (event files in
    ``<output_dir>/tensorboard``), keyed by the record's step: ``loss_sst``, ``lr``, ``dev/overall``...
    A log made with ``enabled=False`` (the other ranks' under torchrun, where rank 0 alone writes) opens no
    file and writes nothing.
    """

    def __init__(self, path: Path, report_to: str = "none", enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._writer_class = None  # the SummaryWriter is made at the first record (see write)
        self._tb = None
        self._last_step = 0
        if report_to == "tensorboard":
            self._writer_class = self.tensorboard_writer_class()
        elif report_to != "none":
            raise ValueError(f"--report_to {report_to}: choose none or tensorboard")
        # Appended to by a resumed run; a torn last line is dropped.
        self._log = AppendLog(path) if enabled else None

    @staticmethod
    def tensorboard_writer_class():
        """torch's SummaryWriter, or a one-line ValueError naming the package to install."""
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; checked first for a clear message)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or pip install 'minbert[tensorboard]')") from None
        return SummaryWriter

    def write(self, **record) -> None:
        if not self.enabled:
            return
        self._log.write_line(json_text(finite_or_null(record), indent=None))  # NaN loss -> null
        if self._writer_class is not None and self._tb is None:
            # A resumed run first writes {"resumed_from_step": N}: TensorBoard then hides the killed run's
            # events past step N, which the resumed run logs again.
            resumed = record.get("resumed_from_step")
            self._tb = self._writer_class(log_dir=str(Path(self.path).parent / "tensorboard"),
                                          purge_step=resumed + 1 if isinstance(resumed, int) else None)
            self._last_step = resumed or 0
            if resumed is not None:
                return
        if self._tb is not None:
            # Records without a step (the final one) are plotted at the last step seen, under "final/".
            step = record.get("step", self._last_step)
            self._last_step = step
            prefix = "final/" if record.get("final") else ""
            for name, value in _numeric_fields(record):
                if name not in ("step", "epoch"):
                    self._tb.add_scalar(prefix + name, value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._tb is not None:
            self._tb.close()


def _numeric_fields(record: dict, prefix: str = ""):
    """(name, number) pairs of a record, nested dicts flattened as ``dev/sst``; booleans are not numbers here."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _numeric_fields(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (getrusage's ru_maxrss: KiB on Linux, bytes on macOS;
    None on Windows, which has no ``resource`` module). It never goes down, so it is one run's own peak only when
    the process trains one run (as the mtl table's worker runs do); several runs in one process each report the
    peak of all so far."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
