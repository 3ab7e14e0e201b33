"""The per-step loss log of a training run, DIR/loss_log.csv (columns step, epoch, loss, seconds).

    log = LossLog(DIR, start_step)   # keeps the rows up to start_step (a resumed run rewrites what came after)
    log.add(step, epoch, loss, seconds)
    log.flush()                      # helpers.train: at every checkpoint, before it is written, and at the end
    rows = read_loss_log(DIR)
    loss_curves({"text_aware": rows})  # raw values faint, a moving average on top (a matplotlib Figure)

Rows are buffered in memory and appended in one write per checkpoint: on Google Drive every write to a file
is a sync, so one append per step would be hundreds of small uploads per run. The log is flushed before the
checkpoint of the same step is written, so a checkpoint never exists without its rows; rows past the newest
checkpoint (flushed when a run is interrupted) are cut when the run resumes from that checkpoint.

The file is append-only, and rewritten only whole (helpers.support.atomic), so an interruption leaves either
the old log or the new one. A last line without its end of line (the process died while appending) is
dropped with a printed line: its step comes after the newest checkpoint, so the resumed run writes it again.
Any other malformed line stops the reader with a TrainingError naming the file and the line.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

from ..support.atomic import write_text
from ..support.disk import disk_errors
from .errors import TrainingError

LOSS_LOG = "loss_log.csv"
COLUMNS = ["step", "epoch", "loss", "seconds"]


class LossLog:
    """DIR/loss_log.csv of one run, written in batches (see the module docstring). enabled=False (a process
    other than the main one) keeps nothing and writes nothing."""

    def __init__(self, output_dir, start_step: int, *, enabled: bool = True, say=print):
        self.path = Path(output_dir) / LOSS_LOG
        self.enabled = enabled
        self.rows: list[list[str]] = []
        if enabled:
            truncate_log(self.path, start_step, say=say)

    def add(self, step: int, epoch: int, loss: float, seconds: float) -> None:
        if self.enabled:
            self.rows.append([str(step), str(epoch), f"{loss:.6f}", f"{seconds:.4f}"])

    def flush(self) -> None:
        """Append the buffered rows to the file (one open and write), then forget them. A full disk raises
        helpers.support.disk.DiskFull naming the file."""
        if self.enabled and self.rows:
            with disk_errors(self.path, what="the loss log"), open(self.path, "a", newline="") as f:
                csv.writer(f).writerows(self.rows)
            self.rows = []


def _rows(path: Path, *, say=print) -> list[list[str]]:
    """The rows of a loss log as written (lists of 4 strings, the header left out); [] for no file. A cut last
    line is dropped (and `say` told); a malformed line raises TrainingError naming the file and the line."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        say(f"{path}, line {len(lines)}: cut off ({lines[-1]!r}, no end of line: the run stopped while appending "
            "it); dropped. The run writes that step again.")
        lines.pop()
    if not lines:
        return []
    if next(csv.reader(lines[:1])) != COLUMNS:
        raise TrainingError(f"{path}, line 1: {lines[0].strip()!r} is not the loss log's header "
                            f"({','.join(COLUMNS)}). Move the file away (a run writes a new one) or start over "
                            "(FRESH_START in notebook 03, --fresh-start).")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        row = next(csv.reader([line]), [])
        if not row:
            continue  # an empty line holds nothing to lose
        try:
            if len(row) != len(COLUMNS):
                raise ValueError(f"{len(row)} values, not {len(COLUMNS)}")
            int(row[0]), int(row[1]), float(row[2]), float(row[3])
        except ValueError as e:
            raise TrainingError(
                f"{path}, line {number}: {line.strip()!r} is not a row of {','.join(COLUMNS)} ({e}). Correct or "
                "delete that line and run again: the log is a record of the losses, the checkpoints hold the "
                "run; or start over (FRESH_START in notebook 03, --fresh-start).") from None
        rows.append(row)
    return rows


def truncate_log(path: Path, step: int, *, say=print) -> None:
    """Keep the loss log's rows up to `step` (a resumed run rewrites what came after its checkpoint), rewriting
    the file atomically; no rewrite when nothing changes. Raises TrainingError for a malformed line."""
    path = Path(path)
    rows = _rows(path, say=say)
    kept = [r for r in rows if int(r[0]) <= step]
    if path.is_file() and len(kept) == len(rows) and path.read_bytes().endswith(b"\n"):
        return
    lines = [",".join(COLUMNS)] + [",".join(r) for r in kept]
    write_text(path, "".join(f"{line}\r\n" for line in lines))  # csv's own line ending, as flush appends


def read_loss_log(output_dir, *, say=print) -> list[dict]:
    """The per-step loss log of a run: [{"step", "epoch", "loss", "seconds"}, ...]. A cut last line is dropped
    (and `say` told); a malformed line raises TrainingError naming the file and the line."""
    path = Path(output_dir) / LOSS_LOG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no loss log (the run has not reached its first checkpoint)")
    return [{"step": int(r[0]), "epoch": int(r[1]), "loss": float(r[2]), "seconds": float(r[3])}
            for r in _rows(path, say=say)]


def _moving_average(values, k: int = 20) -> list[float]:
    k = max(1, min(k, len(values) // 5 or 1))
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def loss_curves(logs: dict[str, list[dict]], *, title: str = "training loss"):
    """Per-step losses of training runs ({label: read_loss_log(...)}), raw values faint and a
    moving average on top, one colour per run. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for (label, log), color in zip(logs.items(), itertools.cycle(("tab:blue", "tab:orange", "tab:green", "tab:red"))):
        steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
        ax.plot(steps, losses, color=color, alpha=0.25)
        ax.plot(steps, _moving_average(losses), color=color, label=label)
    ax.set(xlabel="step", ylabel="diffusion loss (MSE)", title=title)
    ax.legend()
    return fig
