"""The training data: load a source, check every image, caption, split without mirror leakage, save.

    prep = prepare_dataset(source, out_dir, resolution=512)   # load, check, caption, split, save
    prep = load_prepared(out_dir)                               # the same object, from disk

The steps live in their own modules: reading the source (helpers.sources), decoding and checking each
image (helpers.images), captions (helpers.captions), near-duplicate groups and the split
(helpers.duplicates). The model features training reads are cached by helpers.features.

Every item is decoded and checked on its own, so one broken file never stops the rest: broken ones are
listed in `prep.skipped` with the reason. Images are centre-cropped to a square and resized to `resolution`.

On disk (`out_dir`):

    prepared.json               what was prepared from what (written last: its presence means complete)
    skipped.json                [{"item": name, "reason": why}, ...]
    train/, test/               datasets.Dataset.save_to_disk: columns id, image (PNG, RGB, resolution^2),
                                text, caption_source, group, hash
    <filename>.safetensors      the feature cache (helpers.features), fp16, rows in the split's order
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .captions import caption
from .duplicates import HASH_SIZE, MAX_HASH_DISTANCE, hash_distances, near_duplicate_groups, split_by_group
from .images import SkipItem, center_square, decode_image, png_bytes
from .sources import DataSourceError, SourceItem, open_source, source_stamp  # noqa: F401  (DataSourceError: public here)

PREPARED_VERSION = "1"  # bump when prepared data would come out different, so old folders are rebuilt
DATA_SEED = 0  # the split seed prepare_for_training uses (notebook 01 uses the same, so training reuses its work)


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
    key = {"version": PREPARED_VERSION, "source": source_stamp(source), "resolution": resolution,
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

    items, skipped, description = open_source(source)
    kept: list[tuple[SourceItem, Image.Image]] = []
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
        new, origin = caption([kept[i][1] for i in missing], captioner, progress)
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
        r["image"].append({"bytes": png_bytes(im), "path": None})
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
