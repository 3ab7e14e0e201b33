"""Reading a data source into items (name, id, bytes reader, caption), one per input image.

Sources: a Hugging Face Hub dataset id, a local dataset folder or parquet file (both read with
`datasets.load_dataset`), a folder saved with `save_to_disk`, an in-memory `datasets.Dataset`, or a folder of
image files with an optional `metadata.jsonl` (one JSON object per line: `{"file_name": "a.png", "text": "a
caption"}`). Nothing is decoded here: each item's bytes are read when helpers.data.prepare checks it, so one broken
file never stops the rest.

A source reads only files in its own folders (`own_folders`): a local folder is its own folder, a parquet file
its folder, a Hub dataset the Hugging Face caches it is downloaded and extracted into (imagefolder-style Hub
datasets give absolute paths there). A parquet or dataset row `{"path": ...}` without bytes, or a symlink in an
image folder, that leads anywhere else is skipped as "outside the dataset": a shared dataset must not read the
files of the machine that prepares it into training data. Relative paths are taken from the own folder. An
in-memory datasets.Dataset is your own code's and has no such limit.

    items, skipped, description = open_source(source)   # FileNotFoundError / DataSourceError for a bad source
    stamp = source_stamp(source)                         # cheap identity: has the source changed?
    folders = own_folders(source)                        # where its files may lie (None: anywhere)
    files = mask_files(masks, source)                    # the MASKS folder: {mask_key(item id): file}

A masks folder (notebook 01's MASKS, prepare_dataset(masks=...)) holds the user's own masks, one image file
per source image, at the same relative path and name with any image extension ("sub/a.jpg" -> "sub/a.png");
a dataset's rows are named by their ids ("row-00012.png"). It lies outside the image folder, as kohya's
`conditioning_data_dir` does: a masks/ folder inside it would be read as training images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..support.compat import dataset_fingerprint
from ..support.loading import loading
from ..support.locations import is_hub_id
from .images import SkipItem

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
METADATA_FILE = "metadata.jsonl"


class DataSourceError(ValueError):
    """The source as a whole cannot be used (unreadable file, no usable image); the message names it."""


@dataclass
class SourceItem:
    """One input of a source, not read yet: `read()` gives its file bytes (or raises SkipItem)."""

    name: str  # for people: "row 12", "drawings/a.png"
    id: str  # stable: "row-00012", "drawings/a.png"
    read: Callable[[], bytes]
    text: str | None
    caption_source: str | None


def _is_image_folder(folder: Path) -> bool:
    if (folder / METADATA_FILE).is_file():
        return True
    data_files = any(p.suffix in (".parquet", ".arrow") for p in folder.rglob("*") if p.is_file())
    return not data_files and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def files_stamp(path: Path) -> str:
    """A hash of (relative path, size, mtime) of every file under path (or of path itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if p != path else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def source_stamp(source) -> str:
    """Cheap identity of a source, to decide whether prepared data on disk still matches it."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return f"dataset:{dataset_fingerprint(source)}"
    p = Path(str(source)).expanduser()
    if p.exists():
        return f"local:{p.resolve()}:{files_stamp(p)}"
    return f"hub:{source}"  # Hub datasets change rarely; prepare_dataset(..., overwrite=True) re-reads one


def own_folders(source) -> list[Path] | None:
    """The folders (resolved) that a source's files may lie in; the first one is where relative paths start.

    a local folder: itself, and the datasets cache's downloads (where `datasets` extracts a folder's archives);
    a parquet file: its folder; a Hub id: the Hub cache and the datasets cache (HF_HUB_CACHE, HF_DATASETS_CACHE,
    read now); an in-memory datasets.Dataset: None, no limit (your own code built it)."""
    import datasets
    from huggingface_hub import constants

    if isinstance(source, datasets.Dataset):
        return None
    path = Path(str(source)).expanduser()
    if path.is_file():
        return [path.resolve().parent]
    if path.is_dir():
        return [path.resolve(), (Path(datasets.config.HF_DATASETS_CACHE) / "downloads").resolve()]
    return [Path(constants.HF_HUB_CACHE).resolve(), Path(datasets.config.HF_DATASETS_CACHE).resolve()]


def open_source(source) -> tuple[list[SourceItem], list[tuple[str, str]], str]:
    """(items, skipped so far, description). Raises FileNotFoundError / DataSourceError for a bad source."""
    import datasets

    if isinstance(source, datasets.Dataset):
        items, skipped = _dataset_items(source, None)
        return items, skipped, "an in-memory datasets.Dataset"
    text = str(source)
    path = Path(text).expanduser()
    own = own_folders(source)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            ds = _load(lambda: datasets.load_from_disk(str(path)), path, "a folder saved with save_to_disk")
            items, skipped = _dataset_items(ds, own)
            return items, skipped, f"the saved dataset {path}"
        if (path / "dataset_dict.json").is_file():
            ds = _load(lambda: datasets.load_from_disk(str(path))["train"], path, "a saved DatasetDict with 'train'")
            items, skipped = _dataset_items(ds, own)
            return items, skipped, f"the saved dataset {path}"
        if _is_image_folder(path):
            items, skipped = _folder_items(path)
            return items, skipped, f"the image folder {path}"
        ds = _load(lambda: datasets.load_dataset(str(path), split="train"), path, "a dataset folder")
        items, skipped = _dataset_items(ds, own)
        return items, skipped, f"the dataset folder {path}"
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataSourceError(f"{path}: a single file source must be a .parquet file (or pass its folder)")
        ds = _load(lambda: datasets.load_dataset("parquet", data_files=str(path), split="train"), path, "a parquet file")
        items, skipped = _dataset_items(ds, own)
        return items, skipped, f"the parquet file {path}"
    if not is_hub_id(text):
        raise FileNotFoundError(f"{text}: no such file or folder (expected a dataset folder, a parquet file, a "
                                "folder of images, or a Hugging Face Hub dataset id such as owner/name)")
    with loading("dataset (a Hugging Face Hub dataset id, or a local folder)", text, error_type=DataSourceError):
        ds = datasets.load_dataset(text, split="train")
    items, skipped = _dataset_items(ds, own)
    return items, skipped, f"the Hub dataset {text}"


def _load(fn, where, what):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (pyarrow, fsspec, hub errors: all mean "this source is unusable")
        raise DataSourceError(f"{where}: cannot be read as {what}: {type(e).__name__}: {e}") from e


def _dataset_items(ds, own: list[Path] | None) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """One item per row; a row's image is its bytes, else the file its path names within `own` (own_folders)."""
    import datasets

    image_col = "image" if "image" in ds.column_names else next(
        (k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise DataSourceError(f"dataset with columns {ds.column_names}: no 'image' column and no column of type Image")
    text_col = next((c for c in ("text", "caption", "captions") if c in ds.column_names), None)
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # raw bytes: decoding is ours, per item
    raw = ds.select_columns([image_col] + ([text_col] if text_col else []))

    def reader(i):
        def read() -> bytes:
            value = raw[i][image_col]
            if isinstance(value, dict):
                if value.get("bytes"):
                    return value["bytes"]
                if value.get("path"):
                    return _read_file(_inside(value["path"], own))
                return b""
            if isinstance(value, (bytes, bytearray)):
                return bytes(value)
            if isinstance(value, str):
                return _read_file(_inside(value, own))
            raise SkipItem(f"not an image: the {image_col!r} column holds {type(value).__name__}")
        return read

    texts = raw[text_col] if text_col else [None] * len(raw)
    items = []
    for i in range(len(raw)):
        t = texts[i].strip() if isinstance(texts[i], str) else None
        items.append(SourceItem(f"row {i}", f"row-{i:05d}", reader(i), t or None, "dataset" if t else None))
    return items, []


def _inside(name, own: list[Path] | None) -> Path:
    """The file a path entry names (relative: from own[0]), or SkipItem when it, or the file a symlink on
    the way leads to, lies outside every folder of `own` (None: anywhere is fine)."""
    p = Path(name).expanduser()
    if own is None:
        return p
    if not p.is_absolute():
        p = own[0] / p
    real = p.resolve()
    if not any(real.is_relative_to(o) for o in own):
        where = f"{own[0]}" + (f" (nor in {', '.join(map(str, own[1:]))})" if len(own) > 1 else "")
        led = f" (it leads to {real})" if real != p else ""
        raise SkipItem(f"outside the dataset: {name}{led} is not in the source's own folder {where}; not read. "
                       "If it belongs to the dataset, put the file in that folder or its bytes in the row.")
    return p


def _read_file(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise SkipItem(f"missing file: {p}") from None
    except OSError as e:
        raise SkipItem(f"unreadable: {p}: {e}") from None


def _folder_items(folder: Path) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """Every file under folder (except metadata.jsonl and hidden files) is an item; captions come from
    metadata.jsonl lines {"file_name": relative path, "text": caption}."""
    skipped: list[tuple[str, str]] = []
    captions: dict[str, str] = {}
    meta = folder / METADATA_FILE
    if meta.is_file():
        for n, line in enumerate(meta.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{METADATA_FILE} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append((where, f"bad metadata: not valid JSON ({e.msg})"))
                continue
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                skipped.append((where, "bad metadata: no file_name"))
                continue
            name = Path(name).as_posix()
            if not (folder / name).is_file():
                skipped.append((name, f"missing file: named in {METADATA_FILE} line {n} but not in {folder}"))
                continue
            if name in captions:
                skipped.append((where, f"bad metadata: a second line for {name} (the first one is used)"))
                continue
            text = row.get("text")
            captions[name] = text.strip() if isinstance(text, str) else ""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != meta
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    items = []
    own = [folder.resolve()]  # a symlink may lead elsewhere in the folder, not out of it
    for p in files:
        rel = p.relative_to(folder).as_posix()
        text = captions.get(rel) or None
        items.append(SourceItem(rel, rel, (lambda p=p: _read_file(_inside(p, own))), text, METADATA_FILE if text else None))
    return items, skipped


def mask_key(item_id: str) -> str:
    """The name a mask file is found by: the item's id (relative path or row id) without its extension."""
    return Path(item_id).with_suffix("").as_posix()


def mask_files(masks, source=None) -> dict[str, Path]:
    """{mask_key: file} of every image file under the masks folder (hidden files left out). Raises
    FileNotFoundError when it is not a folder, DataSourceError when it lies inside the source's folder or two
    files share a name (a.png and a.jpg)."""
    folder = Path(masks).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the masks folder (MASKS) is not a folder. Give a folder of mask images "
                                "named like your images, or leave MASKS empty to make every mask with the segmenter.")
    src = Path(str(source)).expanduser() if source is not None and not _is_dataset(source) else None
    if src is not None and src.is_dir() and folder.resolve().is_relative_to(src.resolve()):
        raise DataSourceError(f"{folder}: the masks folder lies inside the image folder {src}, so its masks would "
                              "be read as training images. Move it next to the image folder and give that path.")
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS or any(s.startswith(".") for s in rel.parts):
            continue
        key = mask_key(rel.as_posix())
        if key in found:
            raise DataSourceError(f"{folder}: two masks for {key}: {found[key].name} and {p.name}. Keep one.")
        found[key] = p
    return found


def _is_dataset(source) -> bool:
    import datasets

    return isinstance(source, datasets.Dataset)
