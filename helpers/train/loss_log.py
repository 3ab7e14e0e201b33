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
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

LOSS_LOG = "loss_log.csv"
COLUMNS = ["step", "epoch", "loss", "seconds"]


class LossLog:
    """DIR/loss_log.csv of one run, written in batches (see the module docstring). enabled=False (a process
    other than the main one) keeps nothing and writes nothing."""

    def __init__(self, output_dir, start_step: int, *, enabled: bool = True):
        self.path = Path(output_dir) / LOSS_LOG
        self.enabled = enabled
        self.rows: list[list[str]] = []
        if enabled:
            truncate_log(self.path, start_step)

    def add(self, step: int, epoch: int, loss: float, seconds: float) -> None:
        if self.enabled:
            self.rows.append([str(step), str(epoch), f"{loss:.6f}", f"{seconds:.4f}"])

    def flush(self) -> None:
        """Append the buffered rows to the file (one open and write), then forget them."""
        if self.enabled and self.rows:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerows(self.rows)
            self.rows = []


def truncate_log(path: Path, step: int) -> None:
    """Keep the loss log's rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= step]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)


def read_loss_log(output_dir) -> list[dict]:
    """The per-step loss log of a run: [{"step", "epoch", "loss", "seconds"}, ...]."""
    path = Path(output_dir) / LOSS_LOG
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "loss": float(r["loss"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(f)]


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
