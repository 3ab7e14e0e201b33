"""Notebook 05's results.csv: one row per generated image, appended as each batch is scored, so a rerun resumes.

    results = ResultsFile(out_dir / "results.csv")   # reads what an earlier (interrupted) run wrote
    results.has(key)                                  # is this image already scored?
    results.append(rows)                              # one write per batch, flushed and fsynced

A row is identified by `row_key`: (model, adapter_sha256, scale, reference, prompt, seed, steps, guidance).
adapter_sha256 is the identity of the weights that made the image (helpers.sample.registry.adapter_sha256: the
shortened sha256 of the adapter file), so a retrained adapter's images are new rows, never an old adapter's
scores under its name; helpers.evaluate.grid.run_grid keeps only the rows of the bank's current weights.
The batch size is not part of the key: an image depends on its seed, not on its batch (up to rounding).

The file is append-only: rows already there are never rewritten, so a rerun that skips them and appends
the rest in the same order ends with the same bytes as a run that was never interrupted. Floats are
written with Python's shortest round-trip repr and read back with float(), so values survive the round trip
exactly (an empty mask's NaN is written "nan" and read back as NaN). A last line cut short by a crash (no newline) is dropped when the file is opened; an append that
fails (a full disk: helpers.support.disk.DiskFull naming the file) is cut back to the rows before it. Anything
else that is not a row of this format (another version's columns, a second header line, a damaged line, a
row repeated) raises ResultsFileError naming the file, the line and what to do. One writer at a time:
run_grid holds the eval folder's lock (helpers.support.lock) while it appends.

Under a launch of several processes (torchrun, accelerate launch; helpers.support.ranks), each process appends
its own rows to its own share, results.rank-K.csv beside results.csv (same format; a name the lock's clean-up of
temporaries never touches), and `merge_shares` moves them into results.csv in the grid's order, in one atomic
rewrite (a temporary file renamed over it), then deletes the shares. A share left by a killed launch is merged
the same way when the next run starts.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from PIL import Image

from ..sample.generate import Sample
from ..support.atomic import write_text
from ..support.disk import disk_errors
from .stats import IDENTITY  # "adapter_sha256": the column naming the weights a row was made with
from .stats import SUBJECT_SCORES  # clip_i_subject, dino_subject, clip_i_background (helpers.evaluate.metrics)

RESULTS_FILE = "results.csv"  # in the eval folder (helpers.evaluate.outputs names the other files)
SHARE_PREFIX, SHARE_SUFFIX = "results.rank-", ".csv"  # results.rank-K.csv: process K's rows, not merged yet
CSV_COLUMNS = ("model", "adapter_sha256", "scale", "reference", "prompt", "prompt_kind", "edit", "seed", "steps",
               "guidance", "clip_t", "clip_t_x100", "clip_i", "clip_i_x100", "dino", *SUBJECT_SCORES, "subject_coverage",
               "clip_model", "dino_model", "segmenter", "mask_threshold", "file")
KEY_COLUMNS = ("model", "adapter_sha256", "scale", "reference", "prompt", "seed", "steps", "guidance")
_INTS = {"seed", "steps"}
_FLOATS = {"scale", "guidance", "clip_t", "clip_t_x100", "clip_i", "clip_i_x100", "dino", *SUBJECT_SCORES,
           "subject_coverage", "mask_threshold"}
_NEW_FOLDER = "use a new eval folder (EVAL_DIR in notebook 05's Settings, --out-dir of python -m helpers.evaluate)"


class ResultsFileError(ValueError):
    """results.csv cannot be resumed (another format, a damaged line, or scored with other models)."""


def row_key(row) -> tuple:
    """The KEY_COLUMNS of a row dict or of a Sample-like object, typed: (model, adapter_sha256, scale, reference,
    prompt, seed, steps, guidance)."""
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

    def __init__(self, path, *, clip_model: str | None = None, dino_model: str | None = None,
                 segmenter: str | None = None, mask_threshold: float | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self.dropped_partial_line = False
        if self.path is not None and self.path.is_file():
            self._read()
        for column, name, what in (("clip_model", clip_model, "CLIP"), ("dino_model", dino_model, "DINO"),
                                   ("segmenter", segmenter, "the segmenter"),
                                   ("mask_threshold", mask_threshold, "the mask threshold")):
            used = {r[column] for r in self.rows}
            if name is not None and used - {name}:
                raise ResultsFileError(
                    f"{self.path} was scored with {what} {sorted(used)}, this run uses {name!r}: scores from "
                    "different models do not mix. Use another output folder, or delete the file.")
        self._keys = {row_key(r) for r in self.rows}

    def _read(self) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a crash cut the last line short: drop it, and rewrite once
            text = text[: text.rfind("\n") + 1]
            self.dropped_partial_line = True
            self._replace(text)
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return
        if tuple(header) != CSV_COLUMNS:
            older = set(header) <= set(CSV_COLUMNS)
            why = ""
            if older and IDENTITY not in header:
                why = (f": it was written before each row recorded the adapter that made it ({IDENTITY}), so its "
                       "rows cannot be told from a retrained adapter's")
            elif older and not set(SUBJECT_SCORES) <= set(header):
                why = (f": it was written before the subject-only scores ({', '.join(SUBJECT_SCORES)}), which are "
                       "taken from each image in memory as it is made; its saved JPEGs, scored again, would not "
                       "give the same numbers")
            raise ResultsFileError(
                f"{self.path} has the columns {header}, not this version's {list(CSV_COLUMNS)}{why}. "
                f"{_NEW_FOLDER[0].upper() + _NEW_FOLDER[1:]}, or move the file aside to start over.")
        seen: dict[tuple, int] = {}
        line = reader.line_num + 1  # where the next record starts (a quoted field may span lines)
        for record in reader:
            if record:
                row = self._parse(record, line)
                key = row_key(row)
                if key in seen:
                    raise ResultsFileError(
                        f"{self.path}, line {line} repeats the image of line {seen[key]} ({', '.join(map(str, key))}): "
                        f"two writers appended to this file. Delete one of the two lines, or {_NEW_FOLDER}.")
                seen[key] = line
                self.rows.append(row)
            line = reader.line_num + 1

    def _parse(self, record: list[str], line: int) -> dict:
        """One CSV record as a typed row, or ResultsFileError naming the file and the line."""
        where = f"{self.path}, line {line}"
        fix = (f"Delete that line (its image is made and scored again on the next run), or move the file aside and "
               f"{_NEW_FOLDER}.")
        if tuple(record) == CSV_COLUMNS:
            raise ResultsFileError(f"{where}: a second header line: two writers appended to this file at once. {fix}")
        if len(record) != len(CSV_COLUMNS):
            raise ResultsFileError(f"{where}: {len(record)} fields, not {len(CSV_COLUMNS)} ({','.join(record)[:120]!r}): "
                                   f"a damaged line. {fix}")
        row = dict(zip(CSV_COLUMNS, record))
        try:
            return _typed(row)
        except ValueError:
            bad = next(c for c in row if c in _FLOATS | _INTS and not _parses(c, row[c]))
            raise ResultsFileError(f"{where}: {bad} is {row[bad]!r}, not a number: a damaged line. {fix}") from None

    def _replace(self, text: str) -> None:
        write_text(self.path, text, fsync=True)

    def has(self, key: tuple) -> bool:
        return key in self._keys

    def add_at_once(self, rows) -> None:
        """Add rows (those not there yet) by rewriting the whole file at once: a temporary file renamed over it
        (helpers.support.atomic), so it holds all of them or none, whatever stops the write."""
        rows = [r for r in rows if row_key(r) not in self._keys]
        if not rows or self.path is None:
            return
        old = self.path.read_text() if self.path.is_file() else ""
        self._replace((old or ",".join(CSV_COLUMNS) + "\n") + format_rows(rows))
        self.rows += [_typed({c: r[c] for c in CSV_COLUMNS}) for r in rows]
        self._keys.update(row_key(r) for r in rows)

    def append(self, rows) -> None:
        """Append rows (dicts with CSV_COLUMNS) in one write, then flush and fsync: on disk before it returns.
        A write that fails (a full disk: DiskFull naming the file) leaves the file as it was before it."""
        rows = [r for r in rows if row_key(r) not in self._keys]
        if not rows:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            size = self.path.stat().st_size if self.path.is_file() else 0
            try:
                with disk_errors(self.path), open(self.path, "a", newline="") as f:
                    f.write((",".join(CSV_COLUMNS) + "\n" if size == 0 else "") + format_rows(rows))
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                _cut_back(self.path, size)
                raise
        self.rows += [_typed({c: r[c] for c in CSV_COLUMNS}) for r in rows]
        self._keys.update(row_key(r) for r in rows)


def share_path(out_dir, rank: int) -> Path:
    """Where process `rank` of a launch writes its rows: out_dir/results.rank-K.csv."""
    return Path(out_dir) / f"{SHARE_PREFIX}{int(rank)}{SHARE_SUFFIX}"


def share_paths(out_dir) -> list[Path]:
    """The shares in out_dir (results.rank-K.csv), by K."""
    found = []
    for p in Path(out_dir).glob(f"{SHARE_PREFIX}*{SHARE_SUFFIX}"):
        k = p.name[len(SHARE_PREFIX):-len(SHARE_SUFFIX)]
        if k.isdigit():
            found.append((int(k), p))
    return [p for _, p in sorted(found)]


def merge_shares(results: ResultsFile, order=(), *, clip_model: str | None = None, dino_model: str | None = None,
                 segmenter: str | None = None, mask_threshold: float | None = None) -> set[tuple]:
    """Move every share beside `results` (results.rank-K.csv, of this launch or of one that was killed) into it:
    the rows it lacks, those whose key is in `order` (the grid's row keys, in generation order) in that order,
    then the others in share order, added at once (ResultsFile.add_at_once: atomic); then delete the shares.
    A crash before the deletion leaves shares whose rows are all in results.csv: merged again, they add nothing.
    Returns the keys of the last row of results.csv and of each share as found: a cut may have left that row's
    job in part, and run_grid makes such a job again whole (keeping the rows), in the batches it had.
    clip_model, dino_model, segmenter, mask_threshold: as for ResultsFile (a share scored with other models
    raises ResultsFileError)."""
    last = {row_key(results.rows[-1])} if results.rows else set()
    if results.path is None:
        return last
    shares = share_paths(results.path.parent)
    new: dict[tuple, dict] = {}
    for share in shares:
        rows = ResultsFile(share, clip_model=clip_model, dino_model=dino_model, segmenter=segmenter,
                           mask_threshold=mask_threshold).rows
        last.update(row_key(r) for r in rows[-1:])
        for r in rows:
            if not results.has(row_key(r)):
                new.setdefault(row_key(r), r)
    position = {k: i for i, k in enumerate(order)}
    results.add_at_once(sorted(new.values(), key=lambda r: position.get(row_key(r), len(position))))
    for share in shares:
        share.unlink(missing_ok=True)
    return last


def _parses(column: str, value: str) -> bool:
    try:
        (float if column in _FLOATS else int)(value)
        return True
    except ValueError:
        return False


def _cut_back(path: Path, size: int) -> None:
    """Truncate path to `size` bytes (an append that failed part way): needs no free space. Best effort: what
    cannot be cut here is a last line without its newline, which the next open drops."""
    try:
        os.truncate(path, size)
    except OSError:
        pass


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
                          reference_image=refs.get(str(r["reference"])), adapter_sha256=r[IDENTITY]))
    return out
