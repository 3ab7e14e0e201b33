"""Generated images on disk, with the settings that made them, and read back.

`save_samples` writes PNGs whose settings travel in the PNG text chunks (one chunk per setting, plus all of
them as JSON under "ipa-settings") and in an index.json / index.csv beside them; `png_settings` reads one
PNG's settings, `load_saved` a whole folder back into helpers.sample.generate.Sample objects.
`sample_filename` is the one naming of a generated image's file, here and in notebook 05's grid.

Every file is written atomically (helpers.support.atomic: beside it, then renamed over it), so an interruption
leaves the old file or the new one, never half of one; a full disk raises helpers.support.disk.DiskFull naming
the file. The index is written once the call's images are: after an interrupted call it lists what earlier calls
saved, and saving the same samples again writes the same file names (a hash of the settings) and lists them.
Two writers on one folder (two notebook-04 sessions, or 04 and a script) keep each other's rows: the index is
read, added to and rewritten under the folder's helpers.support.lock.FolderLock, held only for that (a writer
that finds it held waits up to LOCK_WAIT_SECONDS), so rows another writer added meanwhile are kept.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Iterable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..support.atomic import replacing, write_json, write_text
from ..support.lock import FolderInUse, FolderLock
from .generate import SETTING_NAMES, Sample

SETTINGS_KEY = "ipa-settings"  # PNG text chunk holding every setting as JSON
INDEX_JSON, INDEX_CSV = "index.json", "index.csv"
LOCK_WAIT_SECONDS = 60.0  # how long save_samples waits for another writer's index update before it gives up


def _slug(text: str, n: int = 24) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:n] or "x"


def sample_filename(sample: Sample, suffix: str = ".png") -> str:
    """A readable, unique file name: model, reference, scale, seed and a hash of all settings."""
    digest = hashlib.sha1(json.dumps(sample.settings(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{_slug(sample.model)}_{_slug(sample.reference)}_s{sample.scale:g}_seed{sample.seed}_{digest}{suffix}"


def save_samples(samples: Iterable[Sample], out_dir) -> list[Path]:
    """Write each sample as out_dir/<name>.png with its settings in the PNG text chunks (one chunk per
    setting, plus all of them as JSON under "ipa-settings"), and update out_dir/index.json and
    index.csv (one row per file; saving into the same folder again adds rows). Returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, added = [], {}
    for s in samples:
        settings = s.settings()
        info = PngInfo()
        for k, v in settings.items():
            info.add_text(k, str(v))
        info.add_text(SETTINGS_KEY, json.dumps(settings))
        path = out_dir / sample_filename(s)
        with replacing(path) as tmp:
            s.image.save(tmp, format="PNG", pnginfo=info)
        added[path.name] = {"file": path.name, **settings}
        paths.append(path)
    with _index_lock(out_dir):  # read, add, write: another writer's rows, added meanwhile, are kept
        index = {row["file"]: row for row in _read_index(out_dir)}
        index.update(added)
        rows = list(index.values())
        write_json(out_dir / INDEX_JSON, rows)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=["file", *SETTING_NAMES], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(out_dir / INDEX_CSV, table.getvalue())
    return paths


@contextlib.contextmanager
def _index_lock(out_dir: Path, wait: float | None = None):
    """Hold the folder's FolderLock for the index update, waiting (up to LOCK_WAIT_SECONDS) while another writer
    holds it; then its FolderInUse is raised. clean=False: images are written outside the lock, so a temporary
    in the folder may be another live writer's image."""
    deadline = time.monotonic() + (LOCK_WAIT_SECONDS if wait is None else wait)
    lock = FolderLock(out_dir, "saving samples", clean=False)
    while True:
        try:
            lock.__enter__()
            break
        except FolderInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def _read_index(out_dir: Path) -> list[dict]:
    path = out_dir / INDEX_JSON
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to start a new index") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "file" in r for r in rows):
        raise ValueError(f"{path}: expected a list of objects with a 'file' key")
    return rows


def png_settings(path) -> dict:
    """The settings stored in a PNG written by save_samples (types restored: scale float, seed int, ...)."""
    path = Path(path)
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    if SETTINGS_KEY not in text:
        raise ValueError(f"{path}: no '{SETTINGS_KEY}' text chunk: not written by helpers.sample.saved.save_samples")
    return json.loads(text[SETTINGS_KEY])


def load_saved(out_dir) -> list[Sample]:
    """The samples of a folder written by save_samples, from its index.json (images loaded)."""
    out_dir = Path(out_dir)
    samples = []
    for row in _read_index(out_dir):
        path = out_dir / row["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir / INDEX_JSON} lists {row['file']}, which is not in {out_dir}")
        with Image.open(path) as im:
            image = im.convert("RGB")
        samples.append(Sample(image=image, **{k: row[k] for k in SETTING_NAMES if k in row}))
    return samples
