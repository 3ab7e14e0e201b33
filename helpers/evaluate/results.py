"""Notebook 05's results.csv: one row per generated image, appended as each batch is scored, so a rerun resumes.

    results = ResultsFile(out_dir / "results.csv")   # reads what an earlier (interrupted) run wrote
    results.has(key)                                  # is this image already scored?
    results.append(rows)                              # one write per batch, flushed and fsynced

A row is identified by `row_key`: (model, scale, reference, prompt, seed, steps, guidance). The file is
append-only: rows already there are never rewritten, so a rerun that skips them and appends the rest in
the same order ends with the same bytes as a run that was never interrupted. Floats are written with
Python's shortest round-trip repr and read back with float(), so values survive the round trip exactly.
A last line cut short by a crash (no newline) is dropped when the file is opened.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from PIL import Image

from ..sample.generate import Sample
from ..support.atomic import write_text

CSV_COLUMNS = ("model", "scale", "reference", "prompt", "prompt_kind", "edit", "seed", "steps", "guidance",
               "clip_t", "clip_t_x100", "clip_i", "clip_i_x100", "dino", "clip_model", "dino_model", "file")
KEY_COLUMNS = ("model", "scale", "reference", "prompt", "seed", "steps", "guidance")
_INTS = {"seed", "steps"}
_FLOATS = {"scale", "guidance", "clip_t", "clip_t_x100", "clip_i", "clip_i_x100", "dino"}


class ResultsFileError(ValueError):
    """results.csv cannot be resumed (another format, or scored with other models)."""


def row_key(row) -> tuple:
    """The KEY_COLUMNS of a row dict or of a Sample-like object, typed: (model, scale, reference, prompt, seed,
    steps, guidance)."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    return tuple(float(get(c)) if c in _FLOATS else int(get(c)) if c in _INTS else str(get(c)) for c in KEY_COLUMNS)


def _text(column: str, value) -> str:
    if column in _FLOATS:
        return repr(float(value))
    if column in _INTS:
        return str(int(value))
    return str(value)


def _typed(row: dict) -> dict:
    return {c: float(v) if c in _FLOATS else int(v) if c in _INTS else v for c, v in row.items()}


def format_rows(rows) -> str:
    """CSV text (no header) for rows, columns in CSV_COLUMNS order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([_text(c, row[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


class ResultsFile:
    """results.csv, opened for resuming. `rows` (typed dicts, file order) are the rows already written;
    `append` adds more. path None: nothing is written (rows are only kept in memory)."""

    def __init__(self, path, *, clip_model: str | None = None, dino_model: str | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self.dropped_partial_line = False
        if self.path is not None and self.path.is_file():
            self._read()
        for column, name in (("clip_model", clip_model), ("dino_model", dino_model)):
            used = {r[column] for r in self.rows}
            if name is not None and used - {name}:
                raise ResultsFileError(
                    f"{self.path} was scored with {column.split('_')[0].upper()} {sorted(used)}, this run uses "
                    f"{name!r}: scores from different models do not mix. Use another output folder, or delete the file.")
        self._keys = {row_key(r) for r in self.rows}

    def _read(self) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a crash cut the last line short: drop it, and rewrite once
            text = text[: text.rfind("\n") + 1]
            self.dropped_partial_line = True
            self._replace(text)
        reader = csv.DictReader(io.StringIO(text))
        if text and tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ResultsFileError(f"{self.path} has the columns {reader.fieldnames}, not this version's "
                                   f"{list(CSV_COLUMNS)}: use another output folder, or delete the file to start over")
        self.rows = [_typed(r) for r in reader]

    def _replace(self, text: str) -> None:
        write_text(self.path, text, fsync=True)

    def has(self, key: tuple) -> bool:
        return key in self._keys

    def append(self, rows) -> None:
        """Append rows (dicts with CSV_COLUMNS) in one write, then flush and fsync: on disk before it returns."""
        rows = [r for r in rows if row_key(r) not in self._keys]
        if not rows:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with open(self.path, "a", newline="") as f:
                f.write((",".join(CSV_COLUMNS) + "\n" if new else "") + format_rows(rows))
                f.flush()
                os.fsync(f.fileno())
        self.rows += [_typed({c: r[c] for c in CSV_COLUMNS}) for r in rows]
        self._keys.update(row_key(r) for r in rows)


def load_samples(rows, root, references) -> list:
    """helpers.sample.generate.Sample objects for rows, their images read from root/<row file> (the saved
    JPEG), with their reference image (references: Reference objects or {id: PIL image})."""
    refs = references if isinstance(references, dict) else {r.id: r.image for r in references}
    out = []
    for r in rows:
        if not r.get("file"):
            raise FileNotFoundError(f"row {row_key(r)} has no image file (run_grid wrote none: out_dir was None)")
        with Image.open(Path(root) / r["file"]) as im:
            image = im.convert("RGB")
        out.append(Sample(image, r["model"], str(r["reference"]), r["prompt"], float(r["scale"]), int(r["seed"]),
                          int(r["steps"]), float(r["guidance"]), resolution=image.width,
                          reference_image=refs.get(str(r["reference"]))))
    return out
