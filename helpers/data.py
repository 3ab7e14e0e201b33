"""The training data: load, check, caption, split without mirror leakage, and cache model features.

    prep = prepare_dataset(source, out_dir, resolution=512)         # load, check, caption, split, save
    prep = load_prepared(out_dir)                                     # the same object, from disk
    path = cache_features(prep.train, out_dir, base_model=..., ip_adapter=..., resolution=512)
    tensors, meta = load_feature_cache(path)
    prep, path = prepare_for_training(profile, data_dir)              # both, idempotent (training calls it)

Sources (`prepare_dataset`): a Hugging Face Hub dataset id, a local dataset folder or parquet file (both
read with `datasets.load_dataset`), a folder saved with `save_to_disk`, an in-memory `datasets.Dataset`,
or a folder of image files with an optional `metadata.jsonl` (one JSON object per line:
`{"file_name": "a.png", "text": "a caption"}`). Every item is decoded and checked on its own, so one
broken file never stops the rest: unusual but valid images are converted to RGB (transparency composited
on white, greyscale, CMYK, 16-bit, EXIF orientation applied) and kept; broken ones are listed in
`prep.skipped` with the reason. Images are centre-cropped to a square and resized to `resolution`.

Leakage: the Rick and Morty dataset holds a horizontally mirrored copy of each drawing. Each image gets
a 256-bit difference hash (dHash) of itself and of its mirror; images whose hashes (either way round)
differ in at most `max_hash_distance` bits share a `group` (union-find), and the train/test split assigns
whole groups, so no test image has its mirror or near-duplicate in training.

On disk (`out_dir`):

    prepared.json               what was prepared from what (written last: its presence means complete)
    skipped.json                [{"item": name, "reason": why}, ...]
    train/, test/               datasets.Dataset.save_to_disk: columns id, image (PNG, RGB, resolution^2),
                                text, caption_source, group, hash
    <filename>.safetensors      the feature cache (cache_features), fp16, rows in the split's order
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .adapter import default_device_dtype, load_pipeline

PREPARED_VERSION = "1"  # bump when prepared data would come out different, so old folders are rebuilt
CACHE_VERSION = "1"  # the same for the feature cache
HASH_SIZE = 16  # dHash grid: 16 x 16 = 256 bits
MAX_HASH_DISTANCE = 6  # bits; JPEG re-encoding and rescaling move a 256-bit dHash by <= 3 bits
PLACEHOLDER_CAPTION = "a drawing (placeholder caption: no captioner in this profile)"
TRAIN_FEATURES = "train_features.safetensors"
DATA_SEED = 0  # the split seed prepare_for_training uses (notebook 01 uses the same, so training reuses its work)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
METADATA_FILE = "metadata.jsonl"
# skip reasons start with one of these, so a report can be grouped by kind
SKIP_KINDS = ("empty file", "not an image", "truncated or corrupt", "too small", "too large", "missing file",
              "bad metadata", "unreadable")
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # + RIFF....WEBP


class DataSourceError(ValueError):
    """The source as a whole cannot be used (unreadable file, no usable image); the message names it."""


class SkipItem(Exception):
    """One input that is not kept; `reason` says why (starts with one of SKIP_KINDS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class PreparedData:
    """What prepare_dataset returns (and load_prepared reads back).

    train, test: datasets.Dataset with columns id (str, stable per input row or file), image (PIL RGB,
                 resolution x resolution), text, caption_source ("dataset", "metadata.jsonl", "blip",
                 "placeholder", ...), group (int: near-duplicate group, never split), hash (hex dHash)
    skipped:     [(item name, reason)] for every input not kept
    info:        the contents of prepared.json (source, resolution, seed, counts, ...)
    """

    train: "datasets.Dataset"  # noqa: F821
    test: "datasets.Dataset"  # noqa: F821
    skipped: list[tuple[str, str]]
    out_dir: Path
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.info.get("counts", {})
        groups = c.get("groups", "?")
        return (f"{c.get('items', '?')} inputs: {len(self.train) + len(self.test)} kept, {len(self.skipped)} skipped; "
                f"{groups} near-duplicate groups; train {len(self.train)} rows, test {len(self.test)} rows "
                f"({self.info.get('resolution')} px) in {self.out_dir}")


# --------------------------------------------------------------------------------------------------
# One image: decode, check, convert to RGB, crop
# --------------------------------------------------------------------------------------------------


def decode_image(data: bytes, *, min_side: float = 0) -> Image.Image:
    """Bytes of an image file -> a PIL RGB image, EXIF orientation applied. Raises SkipItem(reason).

    Transparent images (RGBA, LA, palette or RGB/L with a transparent colour) are composited on white;
    16-bit greyscale (I;16, or I with values above 255) is scaled to 8 bits rather than clipped; CMYK,
    greyscale, bilevel and other modes go through PIL's conversion. `min_side`: shorter side below it ->
    "too small".
    """
    if not data:
        raise SkipItem("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise SkipItem("truncated or corrupt: starts like an image file but cannot be opened") from None
        raise SkipItem("not an image: no image format recognised") from None
    except Image.DecompressionBombError as e:
        raise SkipItem(f"too large: {e}") from None
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise SkipItem(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipItem(f"truncated or corrupt: {im.format} data does not decode ({e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001  (a corrupt EXIF block: keep the pixels as stored)
        pass
    w, h = im.size
    if min(w, h) < min_side:
        raise SkipItem(f"too small: {w}x{h} px, shorter side under {min_side:g} px")
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB (alpha composited on white; 16-bit and float greyscale scaled to 8 bits)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":  # I;16*, I (32-bit int), F (float)
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "I":
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0  # 16-bit PNGs open as "I" in older Pillow
        else:
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def center_square(im: Image.Image, resolution: int) -> Image.Image:
    """Centre crop to a square and resize to resolution x resolution (Lanczos)."""
    if im.size == (resolution, resolution):
        return im
    return ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Near duplicates: dHash of an image and of its mirror, union-find over small Hamming distances
# --------------------------------------------------------------------------------------------------


def dhash(im: Image.Image, hash_size: int = HASH_SIZE) -> np.ndarray:
    """Difference hash: greyscale, resized to (hash_size + 1) x hash_size, one bit per horizontally adjacent
    pair (is the right pixel brighter?). Returns a bool array of hash_size**2 bits. Robust to re-encoding
    and rescaling; a mirrored image has a different hash, so hash the mirror too (see near_duplicate_groups)."""
    g = np.asarray(im.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.float32)
    return (g[:, 1:] > g[:, :-1]).ravel()


def hash_distances(images: Sequence[Image.Image], hash_size: int = HASH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, distance): hashes (N, hash_size**2) bool; distance (N, N) int, the Hamming distance between
    image i and image j or j's mirror, whichever is smaller (so an exact mirror pair is at 0)."""
    hashes = np.stack([dhash(im, hash_size) for im in images]) if images else np.zeros((0, hash_size**2), bool)
    flipped = np.stack([dhash(ImageOps.mirror(im), hash_size) for im in images]) if images else hashes
    return hashes, _hamming_min(hashes, flipped)


def _hamming_min(hashes: np.ndarray, flipped: np.ndarray, chunk: int = 1024) -> np.ndarray:
    # On +-1 vectors a . b = agreements - disagreements = bits - 2 * distance; rows in chunks to bound memory
    a = hashes.astype(np.float32) * 2 - 1  # (N, B)
    f = flipped.astype(np.float32) * 2 - 1
    bits = hashes.shape[1]
    out = np.empty((len(a), len(a)), dtype=np.int32)
    for s in range(0, len(a), chunk):
        same = np.maximum(a[s:s + chunk] @ a.T, a[s:s + chunk] @ f.T)  # agreements - disagreements
        out[s:s + chunk] = np.rint((bits - same) / 2).astype(np.int32)
    return out


def near_duplicate_groups(distance: np.ndarray, max_distance: int = MAX_HASH_DISTANCE) -> np.ndarray:
    """Union-find over pairs with distance <= max_distance. Returns (N,) int group labels, numbered
    0, 1, ... in order of first appearance."""
    n = len(distance)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(distance <= max_distance, k=1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(n)]
    label = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return np.array([label[r] for r in roots], dtype=np.int64)


def split_by_group(groups: Sequence[int], test_fraction: float, seed: int = 0) -> np.ndarray:
    """(N,) bool, True for test rows. Whole groups go to test, in a seeded random order, until the test
    split holds round(test_fraction * N) rows (groups that would overshoot are passed over; if none fits,
    the smallest one is taken)."""
    groups = np.asarray(groups)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    is_test = np.zeros(len(groups), dtype=bool)
    if test_fraction == 0 or len(groups) == 0:
        return is_test
    labels, sizes = np.unique(groups, return_counts=True)
    if len(labels) < 2:
        raise DataSourceError(f"all {len(groups)} images are near-duplicates of each other (one group): "
                              "there is nothing to hold out without leakage")
    target = max(1, round(test_fraction * len(groups)))
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen, count = [], 0
    for k in order:
        if count + sizes[k] <= target:
            chosen.append(labels[k])
            count += sizes[k]
    if not chosen:
        chosen = [labels[min(order, key=lambda k: sizes[k])]]
    is_test[np.isin(groups, chosen)] = True
    return is_test


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    name: str  # for people: "row 12", "drawings/a.png"
    id: str  # stable: "row-00012", "drawings/a.png"
    read: Callable[[], bytes]
    text: str | None
    caption_source: str | None


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1 or source.endswith("/")
            or source.endswith((".parquet", ".arrow", ".jsonl", ".csv")))


def _is_image_folder(folder: Path) -> bool:
    if (folder / METADATA_FILE).is_file():
        return True
    data_files = any(p.suffix in (".parquet", ".arrow") for p in folder.rglob("*") if p.is_file())
    return not data_files and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def _files_stamp(path: Path) -> str:
    """A hash of (relative path, size, mtime) of every file under path (or of path itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if p != path else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _source_stamp(source) -> str:
    """Cheap identity of a source, to decide whether prepared data on disk still matches it."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return f"dataset:{source._fingerprint}"
    p = Path(str(source)).expanduser()
    if p.exists():
        return f"local:{p.resolve()}:{_files_stamp(p)}"
    return f"hub:{source}"  # Hub datasets change rarely; prepare_dataset(..., overwrite=True) re-reads one


def _open_source(source) -> tuple[list[_Item], list[tuple[str, str]], str]:
    """(items, skipped so far, description). Raises FileNotFoundError / DataSourceError for a bad source."""
    import datasets

    if isinstance(source, datasets.Dataset):
        items, skipped = _dataset_items(source)
        return items, skipped, "an in-memory datasets.Dataset"
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            ds = _load(lambda: datasets.load_from_disk(str(path)), path, "a folder saved with save_to_disk")
            items, skipped = _dataset_items(ds)
            return items, skipped, f"the saved dataset {path}"
        if (path / "dataset_dict.json").is_file():
            ds = _load(lambda: datasets.load_from_disk(str(path))["train"], path, "a saved DatasetDict with 'train'")
            items, skipped = _dataset_items(ds)
            return items, skipped, f"the saved dataset {path}"
        if _is_image_folder(path):
            items, skipped = _folder_items(path)
            return items, skipped, f"the image folder {path}"
        ds = _load(lambda: datasets.load_dataset(str(path), split="train"), path, "a dataset folder")
        items, skipped = _dataset_items(ds)
        return items, skipped, f"the dataset folder {path}"
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataSourceError(f"{path}: a single file source must be a .parquet file (or pass its folder)")
        ds = _load(lambda: datasets.load_dataset("parquet", data_files=str(path), split="train"), path, "a parquet file")
        items, skipped = _dataset_items(ds)
        return items, skipped, f"the parquet file {path}"
    if _looks_local(text):
        raise FileNotFoundError(f"{text}: no such file or folder (expected a dataset folder, a parquet file, a "
                                "folder of images, or a Hugging Face Hub dataset id such as owner/name)")
    ds = _load(lambda: datasets.load_dataset(text, split="train"), text, "a Hub dataset (or it is not reachable)")
    items, skipped = _dataset_items(ds)
    return items, skipped, f"the Hub dataset {text}"


def _load(fn, where, what):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (pyarrow, fsspec, hub errors: all mean "this source is unusable")
        raise DataSourceError(f"{where}: cannot be read as {what}: {type(e).__name__}: {e}") from e


def _dataset_items(ds) -> tuple[list[_Item], list[tuple[str, str]]]:
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
                    return _read_file(Path(value["path"]))
                return b""
            if isinstance(value, (bytes, bytearray)):
                return bytes(value)
            if isinstance(value, str):
                return _read_file(Path(value))
            raise SkipItem(f"not an image: the {image_col!r} column holds {type(value).__name__}")
        return read

    texts = raw[text_col] if text_col else [None] * len(raw)
    items = []
    for i in range(len(raw)):
        t = texts[i].strip() if isinstance(texts[i], str) else None
        items.append(_Item(f"row {i}", f"row-{i:05d}", reader(i), t or None, "dataset" if t else None))
    return items, []


def _read_file(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise SkipItem(f"missing file: {p}") from None
    except OSError as e:
        raise SkipItem(f"unreadable: {p}: {e}") from None


def _folder_items(folder: Path) -> tuple[list[_Item], list[tuple[str, str]]]:
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
    for p in files:
        rel = p.relative_to(folder).as_posix()
        text = captions.get(rel) or None
        items.append(_Item(rel, rel, (lambda p=p: _read_file(p)), text, METADATA_FILE if text else None))
    return items, skipped


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def blip_captions(images: Sequence[Image.Image], model_id: str, *, batch_size: int = 16, device=None,
                  max_new_tokens: int = 40, progress: bool = True) -> list[str]:
    """Caption images with a BLIP captioning model (e.g. Salesforce/blip-image-captioning-base), fp16 on a
    GPU, batched, with a progress bar. Returns one caption per image."""
    from tqdm.auto import tqdm
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device, dtype = default_device_dtype(device)
    processor = BlipProcessor.from_pretrained(model_id)
    model = BlipForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()  # transformers' name, whatever diffusers uses
    out: list[str] = []
    with torch.no_grad(), tqdm(total=len(images), desc="captioning (BLIP)", unit="img", disable=not progress) as bar:
        for s in range(0, len(images), batch_size):
            batch = list(images[s:s + batch_size])
            pixels = processor(images=batch, return_tensors="pt").pixel_values.to(device, dtype)
            ids = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens)
            out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
            bar.update(len(batch))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _caption(images, captioner, progress) -> tuple[list[str], str]:
    """(captions, caption_source) for images that have none."""
    if captioner is None:
        return [PLACEHOLDER_CAPTION] * len(images), "placeholder"
    if callable(captioner):
        return list(captioner(images)), getattr(captioner, "caption_source", "captioner")
    return blip_captions(images, str(captioner), progress=progress), "blip"


# --------------------------------------------------------------------------------------------------
# prepare_dataset / load_prepared
# --------------------------------------------------------------------------------------------------


def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string"),
        "caption_source": datasets.Value("string"), "group": datasets.Value("int64"), "hash": datasets.Value("string"),
    })


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def prepare_dataset(source, out_dir, *, resolution: int, test_fraction: float = 0.1, seed: int = 0,
                    captioner: str | Callable | None = None, max_hash_distance: int = MAX_HASH_DISTANCE,
                    overwrite: bool = False, progress: bool = True) -> PreparedData:
    """Load `source`, check and convert every image, caption what has no caption, split by near-duplicate
    group, save under out_dir and return a PreparedData (train, test, skipped).

    source:      Hub dataset id, local dataset folder or .parquet, save_to_disk folder, datasets.Dataset,
                 or a folder of images with an optional metadata.jsonl (file_name, text)
    resolution:  side of the square training images in pixels (multiple of 8); images with a shorter side
                 under resolution / 2 are skipped as too small
    captioner:   for inputs without a caption: a BLIP model id (profile.captioner), a callable
                 list[PIL.Image] -> list[str], or None for a placeholder text that says it is one
    Re-running with the same arguments and an unchanged source returns what is on disk (no recomputation;
    a local source's files are compared by size and mtime, a Hub dataset by its id: overwrite=True
    re-reads it). A single bad item never raises: it is listed in `skipped`. A bad source raises
    FileNotFoundError or DataSourceError naming it.
    """
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out_dir = Path(out_dir)
    captioner_name = None if captioner is None else (
        getattr(captioner, "__qualname__", repr(captioner)) if callable(captioner) else str(captioner))
    key = {"version": PREPARED_VERSION, "source": _source_stamp(source), "resolution": resolution,
           "test_fraction": test_fraction, "seed": seed, "captioner": captioner_name,
           "hash_size": HASH_SIZE, "max_hash_distance": max_hash_distance}
    manifest = out_dir / "prepared.json"
    if not overwrite and manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("key") == key:
                return load_prepared(out_dir)
        except Exception:  # noqa: BLE001  (unreadable or incomplete folder: prepare again)
            pass

    from tqdm.auto import tqdm

    items, skipped, description = _open_source(source)
    kept: list[tuple[_Item, Image.Image]] = []
    for item in tqdm(items, desc="checking images", unit="img", disable=not progress):
        try:
            im = decode_image(item.read(), min_side=resolution / 2)
            kept.append((item, center_square(im, resolution)))
        except SkipItem as e:
            skipped.append((item.name, e.reason))
        except Exception as e:  # noqa: BLE001  (whatever one item does, the others go on)
            skipped.append((item.name, f"unreadable: {type(e).__name__}: {e}"))
    if not kept:
        kinds = Counter(r.split(":")[0] for _, r in skipped)
        raise DataSourceError(f"{source}: none of its {len(items)} inputs is a usable image "
                              f"({', '.join(f'{k}: {v}' for k, v in kinds.items()) or 'it is empty'})")

    texts = [it.text for it, _ in kept]
    origins = [it.caption_source for it, _ in kept]
    missing = [i for i, t in enumerate(texts) if not t]
    if missing:
        new, origin = _caption([kept[i][1] for i in missing], captioner, progress)
        for i, t in zip(missing, new):
            texts[i], origins[i] = t, origin

    images = [im for _, im in kept]
    hashes, distance = hash_distances(images)
    groups = near_duplicate_groups(distance, max_hash_distance)
    is_test = split_by_group(groups, test_fraction, seed)

    import datasets

    rows = {"id": [], "image": [], "text": [], "caption_source": [], "group": [], "hash": []}
    split_rows = {"train": {k: [] for k in rows}, "test": {k: [] for k in rows}}
    for i, (item, im) in enumerate(kept):
        r = split_rows["test" if is_test[i] else "train"]
        r["id"].append(item.id)
        r["image"].append({"bytes": _png(im), "path": None})
        r["text"].append(texts[i])
        r["caption_source"].append(origins[i])
        r["group"].append(int(groups[i]))
        r["hash"].append(np.packbits(hashes[i]).tobytes().hex())
    info = {
        "format": "ipa-prepared-data", "key": key, "source": str(source) if not isinstance(source, datasets.Dataset)
        else description, "description": description, "resolution": resolution, "test_fraction": test_fraction,
        "seed": seed, "captioner": captioner_name, "max_hash_distance": max_hash_distance,
        "counts": {"items": len(items), "kept": len(kept), "skipped": len(skipped),
                   "groups": int(len(set(groups.tolist()))), "train": int((~is_test).sum()), "test": int(is_test.sum()),
                   "captioned": len(missing)},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _save_prepared(out_dir, {k: datasets.Dataset.from_dict(v, features=_features()) for k, v in split_rows.items()},
                   skipped, info)
    return load_prepared(out_dir)


def _save_prepared(out_dir: Path, splits: dict, skipped, info) -> None:
    """Write splits, skipped.json, then prepared.json last (its presence marks a complete folder)."""
    import datasets

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prepared.json").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" bars for a few MB are noise
    try:
        for name, ds in splits.items():
            if len(ds):  # an empty split is not saved (datasets cannot load one back): load_prepared makes it
                ds.save_to_disk(str(tmp / name))
        for name in splits:
            shutil.rmtree(out_dir / name, ignore_errors=True)
            if (tmp / name).exists():
                os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    _write_json(out_dir / "skipped.json", [{"item": n, "reason": r} for n, r in skipped])
    _write_json(out_dir / "prepared.json", info)


def load_prepared(out_dir) -> PreparedData:
    """Read what prepare_dataset saved in out_dir (no recomputation)."""
    import datasets

    out_dir = Path(out_dir)
    manifest = out_dir / "prepared.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{out_dir}: no prepared data here ({manifest.name} is missing); run prepare_dataset")
    info = json.loads(manifest.read_text())
    skipped = [(r["item"], r["reason"]) for r in json.loads((out_dir / "skipped.json").read_text())]
    splits = {}
    for name in ("train", "test"):
        if info["counts"][name] == 0:
            splits[name] = datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
        else:
            splits[name] = datasets.load_from_disk(str(out_dir / name))
    return PreparedData(train=splits["train"], test=splits["test"], skipped=skipped, out_dir=out_dir, info=info)


# --------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------


def _hub_revision(repo: str) -> str:
    """The Hub commit of a model repo: asked from the Hub when online, else read from the local HF cache."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo, timeout=10).sha
            if sha:
                return sha
        except Exception:  # noqa: BLE001  (no network, gated, rate-limited: fall back to the cache)
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return "unknown"


def _model_stamp(spec) -> str:
    if spec is None:
        return "default"
    p = Path(str(spec)).expanduser()
    if p.exists():
        stamp = f"local:{p.resolve()}:{_files_stamp(p)}"
        if p.is_file() and (p.parent / "image_encoder").is_dir():  # the default image encoder of an adapter file
            stamp += f"+image_encoder:{_files_stamp(p.parent / 'image_encoder')}"
        return stamp
    repo = "/".join(str(spec).split("/")[:2])
    return f"hub:{spec}@{_hub_revision(repo)}"


def _data_fingerprint(split) -> str:
    """sha256 over (id, image bytes, caption) of every row, in order."""
    import datasets

    raw = split.select_columns(["id", "image", "text"]).cast_column("image", datasets.Image(decode=False))
    h = hashlib.sha256()
    for batch in raw.iter(batch_size=64):
        for id_, image, text in zip(batch["id"], batch["image"], batch["text"]):
            data = image["bytes"] if image.get("bytes") else Path(image["path"]).read_bytes()
            h.update(f"{id_}\0{len(data)}\0".encode())
            h.update(data)
            h.update(f"\0{text}\n".encode())
    return h.hexdigest()


def feature_fingerprint(split, *, base_model, ip_adapter, image_encoder=None, resolution: int) -> dict[str, str]:
    """The metadata a cache built now would carry; its "fingerprint" decides reuse."""
    parts = {
        "format": "ipa-feature-cache", "version": CACHE_VERSION, "resolution": str(resolution),
        "data": _data_fingerprint(split), "rows": str(len(split)),
        "base_model": str(base_model), "base_model_stamp": _model_stamp(base_model),
        "ip_adapter": str(ip_adapter), "ip_adapter_stamp": _model_stamp(ip_adapter),
        "image_encoder": str(image_encoder), "image_encoder_stamp": _model_stamp(image_encoder),
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def encode_text(pipe, texts: Sequence[str]) -> torch.Tensor:
    """(B, 77, C) text encoder hidden states, as StableDiffusionPipeline.encode_prompt computes them
    (padding to max_length, truncation, attention mask only if the encoder's config asks for one)."""
    tok = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    device = pipe.text_encoder.device
    mask = tok.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    return pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


def encode_batch(pipe, images: Sequence[Image.Image], texts: Sequence[str], resolution: int) -> dict[str, torch.Tensor]:
    """Features of one batch, in the pipeline's dtype, on its device.

    latent_mean, latent_std  (B, 4, r/8, r/8)  VAE posterior of the image scaled to [-1, 1], UNscaled
                                               (training: (mean + std * eps) * vae.config.scaling_factor)
    image_embeds             (B, 257, 1280)    image encoder hidden_states[-2] of the feature_extractor's
                                               pixels, as pipe.encode_image(..., output_hidden_states=True)
    text_embeds              (B, 77, 768)      text_encoder(input_ids)[0], as pipe.encode_prompt
    (sizes for SD 1.5 + ViT-H/14; the tiny models are narrower)
    """
    images = [center_square(im.convert("RGB"), resolution) for im in images]
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images, height=resolution, width=resolution)
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    enc = pipe.image_encoder
    dtype = next(enc.parameters()).dtype
    clip_pixels = pipe.feature_extractor(images, return_tensors="pt").pixel_values.to(enc.device, dtype)
    image_embeds = enc(clip_pixels, output_hidden_states=True).hidden_states[-2]
    return {"latent_mean": dist.mean, "latent_std": dist.std, "image_embeds": image_embeds,
            "text_embeds": encode_text(pipe, texts)}


def null_features(pipe) -> dict[str, torch.Tensor]:
    """The dropped conditions: null_image_embeds (1, 257, 1280), features of a zero pixel tensor shaped like
    the feature_extractor's output (diffusers' unconditional image branch for Plus: torch.zeros_like of the
    pixel values), and null_text_embeds (1, 77, 768), the empty prompt."""
    enc = pipe.image_encoder
    pixels = pipe.feature_extractor(Image.new("RGB", (64, 64)), return_tensors="pt").pixel_values  # (1, 3, 224, 224)
    zeros = torch.zeros_like(pixels).to(enc.device, next(enc.parameters()).dtype)
    return {"null_image_embeds": enc(zeros, output_hidden_states=True).hidden_states[-2],
            "null_text_embeds": encode_text(pipe, [""])}


def cache_features(split, out_dir, *, base_model, ip_adapter, image_encoder=None, resolution: int,
                   batch_size: int = 16, device=None, filename: str = "features.safetensors",
                   progress: bool = True) -> Path:
    """Encode every row of `split` once and write out_dir/filename (one .safetensors, fp16, atomic).

    Tensors (rows in the split's order; sizes for SD 1.5 + ViT-H/14 at 512 px):
        latent_mean, latent_std (N, 4, r/8, r/8); image_embeds (N, 257, 1280); text_embeds (N, 77, 768);
        null_image_embeds (1, 257, 1280); null_text_embeds (1, 77, 768)   (see encode_batch, null_features)
    Metadata (strings): fingerprint and its parts (data, models, resolution, version), ids (JSON list),
    scaling_factor. An existing file with the same fingerprint is reused without loading any model; a
    different one is rebuilt. Models come from helpers.adapter.load_pipeline (fp16 on a GPU).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    path = Path(out_dir) / filename
    meta = feature_fingerprint(split, base_model=base_model, ip_adapter=ip_adapter, image_encoder=image_encoder,
                               resolution=resolution)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == meta["fingerprint"]:
                    return path
        except Exception:  # noqa: BLE001  (a damaged file is simply rebuilt)
            pass
    if len(split) == 0:
        raise ValueError("cache_features: the split is empty")
    pipe = load_pipeline(base_model, ip_adapter, variant="vanilla", image_encoder=image_encoder, device=device)
    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        with tqdm(total=len(split), desc="caching features", unit="img", disable=not progress) as bar:
            for s in range(0, len(split), batch_size):
                rows = split[s:s + batch_size]
                feats = encode_batch(pipe, rows["image"], rows["text"], resolution)
                for k, v in feats.items():
                    if not torch.isfinite(v).all():
                        raise FloatingPointError(f"non-finite {k} for rows {rows['id']} (dtype {v.dtype}); "
                                                 "try device='cpu' (fp32)")
                    chunks.setdefault(k, []).append(v.to("cpu", torch.float16))
                bar.update(len(rows["id"]))
        tensors = {k: torch.cat(v).contiguous() for k, v in chunks.items()}
        tensors.update({k: v.to("cpu", torch.float16).contiguous() for k, v in null_features(pipe).items()})
    meta["ids"] = json.dumps(list(split["id"]))
    meta["scaling_factor"] = str(pipe.vae.config.scaling_factor)
    meta["device"] = str(pipe.device)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_feature_cache(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by cache_features; tensors are fp16 on the CPU."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature cache here; build it with cache_features or prepare_for_training")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != "ipa-feature-cache":
            raise ValueError(f"{path}: not a feature cache written by helpers.data.cache_features")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def prepare_for_training(profile, data_dir, *, device=None, progress: bool = True) -> tuple[PreparedData, Path]:
    """Everything training needs, built only if missing or stale: the prepared splits of profile.dataset in
    data_dir, and the train split's feature cache data_dir/train_features.safetensors. Returns (prep, path)."""
    prep = prepare_dataset(profile.dataset, data_dir, resolution=profile.resolution,
                           test_fraction=profile.test_fraction, seed=DATA_SEED, captioner=profile.captioner,
                           progress=progress)
    path = cache_features(prep.train, data_dir, base_model=profile.base_model, ip_adapter=profile.ip_adapter,
                          image_encoder=profile.image_encoder, resolution=profile.resolution,
                          batch_size=profile.feature_batch_size, device=device,
                          filename=TRAIN_FEATURES, progress=progress)
    return prep, path
