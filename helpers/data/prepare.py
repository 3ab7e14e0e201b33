"""The training data: load a source, check every image, caption, split without mirror leakage, save.

    prep = prepare_dataset(source, out_dir, resolution=512)   # load, check, caption, split, save
    prep = load_prepared(out_dir)                               # the same object, from disk
    prep = use_prepared(out_dir, profile)                       # what notebooks 03-05 and the CLIs call

The prepared folder is the contract between the notebooks: notebook 01 writes it (from the profile's dataset
or the user's own images), and everything after it reads it as it is (`use_prepared`): it is prepared from
the profile's dataset only when missing, and a folder prepared with other settings than a caller asks for
is an error (PreparedDataMismatch), never overwritten.

The steps live in their own modules: reading the source (helpers.data.sources), decoding and checking each
image (helpers.data.images), captions (helpers.data.captions), near-duplicate groups and the split
(helpers.data.duplicates). The model features training reads are cached by helpers.data.features.

Every item is decoded and checked on its own, so one broken file never stops the rest: broken ones are
listed in `prep.skipped` with the reason. Images are centre-cropped to a square and resized to `resolution`.

On disk (`out_dir`):

    prepared.json               what was prepared from what (written last: its presence means complete)
    skipped.json                [{"item": name, "reason": why}, ...]
    train/, test/               datasets.Dataset.save_to_disk: columns id, image (PNG, RGB, resolution^2),
                                text, caption_source, group, hash
    <filename>.safetensors      the feature cache (helpers.data.features), fp16, rows in the split's order
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

from ..support.atomic import write_json
from .captions import caption
from .duplicates import (
    HASH_SIZE,
    MAX_HASH_DISTANCE,
    hash_distances,
    near_duplicate_groups,
    split_by_group,
)
from .images import SkipItem, center_square, decode_image, png_bytes
from .sources import DataSourceError, SourceItem, open_source, source_stamp  # noqa: F401  (DataSourceError: public here)

PREPARED_JSON = "prepared.json"  # what was prepared from what; written last, so its presence means complete
PREPARED_VERSION = "2"  # 2: distances symmetric (either image mirrored)  # bump when prepared data would come out different, so old folders are rebuilt
DATA_SEED = 0  # the split seed prepare_for_training uses (notebook 01 uses the same, so training reuses its work)


class PreparedDataMismatch(ValueError):
    """A prepared data folder that holds other data than asked for; the message says what to do."""


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
        text = (f"{c.get('items', '?')} inputs: {len(self.train) + len(self.test)} kept, {len(self.skipped)} skipped; "
                f"{groups} near-duplicate groups; train {len(self.train)} rows, test {len(self.test)} rows "
                f"({self.info.get('resolution')} px) in {self.out_dir}")
        if self.info.get("replaced"):
            text += f"\nThis replaced the data prepared there before: {self.info['replaced']}"
        return text

    def describe(self) -> str:
        """One line: where the data came from and with which settings (from prepared.json)."""
        i = self.info
        return (f"{i.get('source')} at {i.get('resolution')} px, test fraction {i.get('test_fraction')}, split seed "
                f"{i.get('seed')} ({len(self.train)} train / {len(self.test)} test rows, prepared {i.get('created', '?')})")


def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string"),
        "caption_source": datasets.Value("string"), "group": datasets.Value("int64"), "hash": datasets.Value("string"),
    })


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
    before = read_manifest(out_dir)
    if before is not None and not overwrite and before.get("key") == key:
        try:
            return load_prepared(out_dir)
        except Exception:  # noqa: BLE001  (a damaged folder with a valid manifest: prepare again)
            pass
    # 1. read every item and check it on its own
    items, skipped, description = open_source(source)
    kept = _check_items(items, skipped, resolution, source, progress)
    # 2. caption what has no caption
    texts, origins, n_captioned = _captions(kept, captioner, progress)
    # 3. hash each image and its mirror, group near-duplicates, split by group
    images = [im for _, im in kept]
    hashes, distance = hash_distances(images)
    groups = near_duplicate_groups(distance, max_hash_distance)
    is_test = split_by_group(groups, test_fraction, seed)
    # 4. save both splits, prepared.json last
    import datasets

    info = {
        "format": "ipa-prepared-data", "key": key, "source": str(source) if not isinstance(source, datasets.Dataset)
        else description, "description": description, "resolution": resolution, "test_fraction": test_fraction,
        "seed": seed, "captioner": captioner_name, "max_hash_distance": max_hash_distance,
        "counts": {"items": len(items), "kept": len(kept), "skipped": len(skipped),
                   "groups": int(len(set(groups.tolist()))), "train": int((~is_test).sum()), "test": int(is_test.sum()),
                   "captioned": n_captioned},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if before is not None:
        info["replaced"] = (f"{before.get('source')} at {before.get('resolution')} px, test fraction "
                            f"{before.get('test_fraction')} (prepared {before.get('created', '?')})")
    _save_prepared(out_dir, _split_rows(kept, texts, origins, groups, hashes, is_test), skipped, info)
    return load_prepared(out_dir)


def _check_items(items: list[SourceItem], skipped: list, resolution: int, source, progress: bool):
    """Decode and check every item on its own, centre-cropped to resolution; what fails goes to `skipped`
    with its reason. Raises DataSourceError when nothing is usable."""
    from tqdm.auto import tqdm

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
    return kept


def _captions(kept, captioner, progress: bool) -> tuple[list[str], list[str], int]:
    """(texts, caption sources, how many were captioned here): the source's captions, and the captioner's
    for the images that have none."""
    texts = [it.text for it, _ in kept]
    origins = [it.caption_source for it, _ in kept]
    missing = [i for i, t in enumerate(texts) if not t]
    if missing:
        new, origin = caption([kept[i][1] for i in missing], captioner, progress)
        for i, t in zip(missing, new):
            texts[i], origins[i] = t, origin
    return texts, origins, len(missing)


def _split_rows(kept, texts, origins, groups, hashes, is_test) -> dict:
    """{"train": Dataset, "test": Dataset} in the prepared folder's columns."""
    import datasets

    split_rows = {name: {k: [] for k in _features()} for name in ("train", "test")}
    for i, (item, im) in enumerate(kept):
        r = split_rows["test" if is_test[i] else "train"]
        r["id"].append(item.id)
        r["image"].append({"bytes": png_bytes(im), "path": None})
        r["text"].append(texts[i])
        r["caption_source"].append(origins[i])
        r["group"].append(int(groups[i]))
        r["hash"].append(np.packbits(hashes[i]).tobytes().hex())
    return {k: datasets.Dataset.from_dict(v, features=_features()) for k, v in split_rows.items()}


def _save_prepared(out_dir: Path, splits: dict, skipped, info) -> None:
    """Write splits, skipped.json, then prepared.json last (its presence marks a complete folder)."""
    import datasets

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PREPARED_JSON).unlink(missing_ok=True)
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
    write_json(out_dir / "skipped.json", [{"item": n, "reason": r} for n, r in skipped])
    write_json(out_dir / PREPARED_JSON, info)


def read_manifest(out_dir) -> dict | None:
    """A prepared folder's prepared.json (what was prepared from what), or None when there is none or it
    cannot be read (an incomplete folder)."""
    try:
        return json.loads((Path(out_dir) / PREPARED_JSON).read_text())
    except (OSError, ValueError):
        return None


def load_prepared(out_dir) -> PreparedData:
    """Read what prepare_dataset saved in out_dir (no recomputation)."""
    import datasets

    out_dir = Path(out_dir)
    info = read_manifest(out_dir)
    if info is None:
        raise FileNotFoundError(f"{out_dir}: no prepared data here ({PREPARED_JSON} is missing); run prepare_dataset")
    skipped = [(r["item"], r["reason"]) for r in json.loads((out_dir / "skipped.json").read_text())]
    splits = {}
    for name in ("train", "test"):
        if info["counts"][name] == 0:
            splits[name] = datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
        else:
            splits[name] = datasets.load_from_disk(str(out_dir / name))
    return PreparedData(train=splits["train"], test=splits["test"], skipped=skipped, out_dir=out_dir, info=info)


# --------------------------------------------------------------------------------------------------
# The prepared folder as the contract between the notebooks
# --------------------------------------------------------------------------------------------------

_OWN_FILES = {PREPARED_JSON, "skipped.json", "train", "test"}  # and *.safetensors caches, hidden temporaries


def use_prepared(data_dir, profile, *, dataset=None, resolution: int | None = None,
                 test_fraction: float | None = None, announce: bool = True, progress: bool = True) -> PreparedData:
    """The prepared data in data_dir (notebook 01's output), as notebooks 03-05 and the CLIs read it.

    data_dir holds prepared data: it is used as it is, whatever its source (the profile's dataset or your own
    images). Each setting given here (not None) must be the one it was prepared with, else
    PreparedDataMismatch says what the folder holds, what was asked and how to go on; nothing is re-prepared.
    data_dir holds none: it is prepared now, as notebook 01 does, from `dataset` (else profile.dataset) with
    the given values (else the profile's), and that is said (announce=True prints one line).
    A folder that holds other files but no prepared.json (e.g. a folder of your images) is refused.
    """
    data_dir = Path(data_dir)
    if not (data_dir / PREPARED_JSON).is_file():
        strangers = sorted(p.name for p in data_dir.iterdir() if p.name not in _OWN_FILES
                           and not p.name.startswith(".") and p.suffix != ".safetensors") if data_dir.is_dir() else []
        if strangers:
            raise PreparedDataMismatch(
                f"{data_dir} is not a prepared data folder (no prepared.json) but holds other files "
                f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}). If these are your images, "
                "give that folder as the dataset to notebook 01 (DATASET) or prepare_dataset, and let it write "
                "the prepared data to another folder.")
        source = profile.dataset if dataset is None else dataset
        res = profile.resolution if resolution is None else resolution
        frac = profile.test_fraction if test_fraction is None else test_fraction
        if announce:
            print(f"No prepared data in {data_dir} (notebook 01 has not run for this output folder): preparing it "
                  f"now from {source} at {res} px, test fraction {frac}, as notebook 01 does.")
        return prepare_dataset(source, data_dir, resolution=res, test_fraction=frac, seed=DATA_SEED,
                               captioner=profile.captioner, progress=progress)
    prep = load_prepared(data_dir)
    info = prep.info
    differs = []
    if dataset is not None and not _same_source(dataset, info):
        differs.append(("source", info.get("source"), dataset))
    if resolution is not None and resolution != info.get("resolution"):
        differs.append(("resolution", info.get("resolution"), resolution))
    if test_fraction is not None and not np.isclose(test_fraction, info.get("test_fraction", -1)):
        differs.append(("test fraction", info.get("test_fraction"), test_fraction))
    if differs:
        raise PreparedDataMismatch(
            f"{data_dir} holds data prepared from {prep.describe()}, but this run asks for "
            + "; ".join(f"{name} {asked!r} (the folder has {held!r})" for name, held, asked in differs)
            + ". The folder is left as it is. Either re-run notebook 01 with the settings you want (it prepares "
              "that folder again), or point the data folder (DATA_DIR, --data-dir) at another folder, or leave "
              "these settings at None to use the data as prepared.")
    if announce and str(info.get("source")) != str(profile.dataset):
        print(f"Using the data notebook 01 prepared in {data_dir}: {prep.describe()} "
              f"(not the profile's dataset {profile.dataset}).")
    return prep


def _same_source(asked, info: dict) -> bool:
    """Whether `asked` is the source the folder was prepared from, unchanged (a local folder or file: same
    path and the same files; a Hub id: the same id)."""
    return source_stamp(asked) == info.get("key", {}).get("source")


def reference_and_another(prep: PreparedData) -> tuple[dict, dict]:
    """Two rows for a sanity check of the similarity metrics: the first test row, and the first row of another
    near-duplicate group, from the test split when it holds two groups, else from the training split (a small
    dataset's test split may be one group: 12 images give 2 test rows of 1 group)."""
    if len(prep.test) == 0:
        raise ValueError(f"{prep.out_dir}: the test split is empty (test fraction {prep.info.get('test_fraction')}); "
                         "re-run notebook 01 with a test fraction above 0 to hold out references")
    a = prep.test[0]
    for split in (prep.test, prep.train):
        other = next((i for i, g in enumerate(split["group"]) if g != a["group"]), None)
        if other is not None:
            return a, split[other]
    raise ValueError(f"{prep.out_dir}: all {len(prep.train) + len(prep.test)} images are near-duplicates of each "
                     "other (one group): there is no other drawing to compare with; add more images")
