"""The training data: load a source, check every image, caption, split without mirror leakage, save.

    prep = prepare_dataset(source, out_dir, resolution=512)   # load, check, caption, split, save
    prep = prepare_dataset(source, out_dir, resolution=512, masks="my_masks/")   # with the user's own masks
    prep = load_prepared(out_dir)                               # the same object, from disk
    prep = use_prepared(out_dir, profile)                       # what notebooks 03-05 and the CLIs call

The prepared folder is the contract between the notebooks: notebook 01 writes it (from the profile's dataset
or the user's own images), and everything after it reads it as it is (`use_prepared`): it is prepared from
the profile's dataset only when missing, and a folder prepared with other settings than a caller asks for
is an error (PreparedDataMismatch), never overwritten. Nor is a folder without prepared.json that shows traces
of a preparation (split folders, a feature cache, a temporary): it may have held the user's own data.

The steps live in their own modules: reading the source (helpers.data.sources), decoding and checking each
image (helpers.data.images), captions (helpers.data.captions), near-duplicate groups and the split
(helpers.data.duplicates). The model features training reads are cached by helpers.data.features.

Every item is decoded and checked on its own, so one broken file never stops the rest: broken ones are
listed in `prep.skipped` with the reason. Images are centre-cropped to a square and resized to `resolution`;
images over `max_pixels` (helpers.data.images.MAX_PIXELS, 50 Mpx) are refused before they are decoded.
The user's own masks are kept with their images, cropped and resized as they are: a same-named file in the
masks folder (`masks`, helpers.data.sources.mask_files) first, else a transparent image's alpha channel, read
before the image is composited on white. The other rows' masks are made later (helpers.data.masks).

On disk (`out_dir`):

    prepared.json               what was prepared from what, and "splits": the folder that holds it
    prepared-<time>/            one preparation: train/, test/ (datasets.Dataset.save_to_disk: columns id,
                                image (PNG, RGB, resolution^2), text, caption_source, group, hash, and when
                                any row has the user's own mask: mask (PNG, "L", resolution^2, 255 on the
                                character, or None) and mask_source ("alpha", "masks folder" or None)) and
                                skipped.json ([{"item": name, "reason": why}, ...])
    <filename>.safetensors      the feature cache (helpers.data.features), fp16, rows in the split's order;
                                masks.safetensors, every row's mask (helpers.data.masks)
    .lock.json                  while a writer works here (helpers.support.lock: one writer per folder)

A preparation is replaced only by a complete one: the new one is written beside the old (a hidden
`.prepare-*` folder, renamed to prepared-<time> once whole), then prepared.json is replaced in one rename
(the commit), and only then is the old one deleted. A full disk or a killed process at any moment leaves
prepared.json naming one whole preparation; the lock's next holder removes what is left over. The feature
cache carries a fingerprint of the rows it encodes, so a swap makes a cache stale exactly when the data changed.
Folders prepared before this layout (train/, test/, skipped.json beside prepared.json) are read as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..support.atomic import write_json
from ..support.disk import MB, check_space, disk_errors
from ..support.lock import TEMPORARY_MARKERS, FolderLock
from .captions import caption
from .duplicates import (
    HASH_SIZE,
    MAX_HASH_DISTANCE,
    hash_distances,
    near_duplicate_groups,
    split_by_group,
)
from .images import (
    MAX_PIXELS,
    SkipItem,
    center_square,
    center_square_mask,
    decode_image_and_alpha,
    decode_mask,
    png_bytes,
)
from .sources import (  # noqa: F401  (DataSourceError: public here)
    DataSourceError,
    SourceItem,
    files_stamp,
    mask_files,
    mask_key,
    open_source,
    source_stamp,
)

PREPARED_JSON = "prepared.json"  # what was prepared from what, and where; replaced last (the commit): it names a whole one
# bump when prepared data would come out different, so old folders are rebuilt. 2: distances symmetric (either
# image mirrored); 3: the user's own masks kept (alpha channel, masks folder)
PREPARED_VERSION = "3"
FROM_ALPHA, FROM_MASKS_FOLDER = "alpha", "masks folder"  # a row's mask_source: where its user mask came from
DATA_SEED = 0  # the split seed prepare_for_training uses (notebook 01 uses the same, so training reuses its work)
SPLITS_PREFIX = "prepared-"  # prepared-<time>/: one preparation's splits and skipped.json, named by prepared.json
_OLD_LAYOUT = ("train", "test", "skipped.json")  # beside prepared.json, before the prepared-<time> folders


class PreparedDataMismatch(ValueError):
    """A prepared data folder that holds other data than asked for; the message says what to do."""


class PreparedDataDamaged(PreparedDataMismatch):
    """A prepared data folder whose files cannot be read (a cut or missing split file); the message names the
    file and says to rerun notebook 01. A PreparedDataMismatch, so every caller that reports one reports this."""


@dataclass
class PreparedData:
    """What prepare_dataset returns (and load_prepared reads back).

    train, test: datasets.Dataset with columns id (str, stable per input row or file), image (PIL RGB,
                 resolution x resolution), text, caption_source ("dataset", "metadata.jsonl", "blip",
                 "placeholder", ...), group (int: near-duplicate group, never split), hash (hex dHash);
                 when any row has a user mask also mask (PIL "L" or None) and mask_source (FROM_ALPHA,
                 FROM_MASKS_FOLDER or None)
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
        masks = self.info.get("user_masks") or {}
        if masks.get(FROM_ALPHA) or masks.get(FROM_MASKS_FOLDER):
            text += (f"\nYour own masks: {masks.get(FROM_MASKS_FOLDER, 0)} from the masks folder, "
                     f"{masks.get(FROM_ALPHA, 0)} from alpha channels; the other rows are segmented (helpers.data.masks)")
        if masks.get("unused"):
            text += (f"\n{len(masks['unused'])} files in the masks folder name no kept image and were not used: "
                     + ", ".join(masks["unused"][:5]) + (", ..." if len(masks["unused"]) > 5 else ""))
        if self.info.get("replaced"):
            text += f"\nThis replaced the data prepared there before: {self.info['replaced']}"
        return text

    def describe(self) -> str:
        """One line: where the data came from and with which settings (from prepared.json)."""
        i = self.info
        return (f"{i.get('source')} at {i.get('resolution')} px, test fraction {i.get('test_fraction')}, split seed "
                f"{i.get('seed')} ({len(self.train)} train / {len(self.test)} test rows, prepared {i.get('created', '?')})")


def _features(with_masks: bool = False):
    import datasets

    columns = {
        "id": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string"),
        "caption_source": datasets.Value("string"), "group": datasets.Value("int64"), "hash": datasets.Value("string"),
    }
    if with_masks:
        columns.update({"mask": datasets.Image(), "mask_source": datasets.Value("string")})
    return datasets.Features(columns)


def _has_user_masks(info: dict) -> bool:
    masks = info.get("user_masks") or {}
    return bool(masks.get(FROM_ALPHA) or masks.get(FROM_MASKS_FOLDER))


def prepare_dataset(source, out_dir, *, resolution: int, test_fraction: float = 0.1, seed: int = 0,
                    captioner: str | Callable | None = None, max_hash_distance: int = MAX_HASH_DISTANCE,
                    max_pixels: int = MAX_PIXELS, masks=None, overwrite: bool = False,
                    progress: bool = True) -> PreparedData:
    """Load `source`, check and convert every image, caption what has no caption, split by near-duplicate
    group, save under out_dir and return a PreparedData (train, test, skipped).

    source:      Hub dataset id, local dataset folder or .parquet, save_to_disk folder, datasets.Dataset,
                 or a folder of images with an optional metadata.jsonl (file_name, text)
    resolution:  side of the square training images in pixels (multiple of 8); images with a shorter side
                 under resolution / 2 are skipped as too small
    captioner:   for inputs without a caption: a BLIP model id (profile.captioner), a callable
                 list[PIL.Image] -> list[str], or None for a placeholder text that says it is one
    max_pixels:  images with more pixels are skipped as too large, from their header (never decoded)
    masks:       a folder of the user's own masks (notebook 01's MASKS), outside the image folder: one image per
                 source image, same relative path and name, any extension (white or opaque: the character;
                 helpers.data.sources.mask_files, helpers.data.images.decode_mask). It comes before an image's
                 alpha channel. A mask of another size than its image skips the item ("bad mask: ...").
    Re-running with the same arguments and an unchanged source returns what is on disk (no recomputation;
    a local source's files are compared by size and mtime, a Hub dataset by its id: overwrite=True
    re-reads it). A single bad item never raises: it is listed in `skipped`. A bad source raises
    FileNotFoundError or DataSourceError naming it.
    The folder's lock is held throughout (FolderInUse if another writer holds it); the new preparation
    replaces the old one only when complete (module docstring), so a failure (DiskFull naming the folder, an
    interrupt) leaves the old one as it was.
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
    if max_pixels != MAX_PIXELS:  # only then: folders prepared before the limit existed keep their key
        key["max_pixels"] = max_pixels
    found = None
    if masks is not None:  # checked before the lock: a bad folder is refused at once
        found = mask_files(masks, source)
        key["masks"] = f"{Path(masks).expanduser().resolve()}:{files_stamp(Path(masks).expanduser())}"
    with FolderLock(out_dir, "preparing data") as lock:
        before = read_manifest(out_dir)
        _remove_unused(out_dir, before)
        if before is not None and not overwrite and before.get("key") == key:
            try:
                return load_prepared(out_dir)
            except PreparedDataDamaged:  # a damaged folder with a valid manifest: prepare it again
                pass
        return _prepare(source, out_dir, key, before, resolution=resolution, test_fraction=test_fraction, seed=seed,
                        captioner=captioner, captioner_name=captioner_name, max_hash_distance=max_hash_distance,
                        max_pixels=max_pixels, masks=masks, found=found, progress=progress, beat=lock.beat)


def _prepare(source, out_dir: Path, key: dict, before: dict | None, *, resolution, test_fraction, seed, captioner,
             captioner_name, max_hash_distance, max_pixels, masks, found, progress, beat) -> PreparedData:
    """The five steps of prepare_dataset, run while it holds the folder's lock."""
    # 1. read every item and check it on its own (and its own mask, if it has one)
    items, skipped, description = open_source(source)
    kept, user_masks = _check_items(items, skipped, resolution, source, progress, max_pixels, beat, found)
    # 2. caption what has no caption
    texts, origins, n_captioned = _captions(kept, captioner, progress, beat)
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
        "user_masks": {"folder": None if masks is None else str(masks),
                       **Counter(s for _, s in user_masks if s is not None),
                       "unused": sorted(set(found or {}) - {mask_key(it.id) for it, _ in kept})},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if before is not None:
        info["replaced"] = (f"{before.get('source')} at {before.get('resolution')} px, test fraction "
                            f"{before.get('test_fraction')} (prepared {before.get('created', '?')})")
    _save_prepared(out_dir, _split_rows(kept, texts, origins, groups, hashes, is_test, user_masks), skipped, info, beat)
    return load_prepared(out_dir)


def _check_items(items: list[SourceItem], skipped: list, resolution: int, source, progress: bool,
                 max_pixels: int = MAX_PIXELS, beat=lambda: None, mask_files: dict[str, Path] | None = None):
    """Decode and check every item on its own, centre-cropped to resolution; what fails goes to `skipped`
    with its reason. Raises DataSourceError when nothing is usable. Returns (kept: [(item, image)], user masks:
    [(mask "L" at resolution or None, FROM_MASKS_FOLDER / FROM_ALPHA / None)], one per kept item): a file in
    mask_files ({mask_key: path}) first, else the image's alpha channel, cropped and resized as the image."""
    from tqdm.auto import tqdm

    kept: list[tuple[SourceItem, Image.Image]] = []
    user_masks: list[tuple[Image.Image | None, str | None]] = []
    for item in tqdm(items, desc="checking images", unit="img", disable=not progress):
        beat()
        try:
            im, mask = decode_image_and_alpha(item.read(), min_side=resolution / 2, max_pixels=max_pixels)
            origin = None if mask is None else FROM_ALPHA
            mask_file = (mask_files or {}).get(mask_key(item.id))
            if mask_file is not None:
                mask, origin = decode_mask(mask_file.read_bytes(), im.size, name=str(mask_file)), FROM_MASKS_FOLDER
            kept.append((item, center_square(im, resolution)))
            user_masks.append((None if mask is None else center_square_mask(mask, resolution), origin))
        except SkipItem as e:
            skipped.append((item.name, e.reason))
        except Exception as e:  # noqa: BLE001  (whatever one item does, the others go on)
            skipped.append((item.name, f"unreadable: {type(e).__name__}: {e}"))
    if not kept:
        kinds = Counter(r.split(":")[0] for _, r in skipped)
        raise DataSourceError(f"{source}: none of its {len(items)} inputs is a usable image "
                              f"({', '.join(f'{k}: {v}' for k, v in kinds.items()) or 'it is empty'})")
    return kept, user_masks


def _captions(kept, captioner, progress: bool, beat=None) -> tuple[list[str], list[str], int]:
    """(texts, caption sources, how many were captioned here): the source's captions, and the captioner's
    for the images that have none."""
    texts = [it.text for it, _ in kept]
    origins = [it.caption_source for it, _ in kept]
    missing = [i for i, t in enumerate(texts) if not t]
    if missing:
        new, origin = caption([kept[i][1] for i in missing], captioner, progress, beat)
        for i, t in zip(missing, new):
            texts[i], origins[i] = t, origin
    return texts, origins, len(missing)


def _split_rows(kept, texts, origins, groups, hashes, is_test, user_masks) -> dict:
    """{"train": Dataset, "test": Dataset} in the prepared folder's columns (mask and mask_source only when
    some row has a user mask)."""
    import datasets

    features = _features(with_masks=any(s is not None for _, s in user_masks))
    split_rows = {name: {k: [] for k in features} for name in ("train", "test")}
    for i, (item, im) in enumerate(kept):
        r = split_rows["test" if is_test[i] else "train"]
        r["id"].append(item.id)
        r["image"].append({"bytes": png_bytes(im), "path": None})
        r["text"].append(texts[i])
        r["caption_source"].append(origins[i])
        r["group"].append(int(groups[i]))
        r["hash"].append(np.packbits(hashes[i]).tobytes().hex())
        if "mask" in features:
            mask, source = user_masks[i]
            r["mask"].append(None if mask is None else {"bytes": png_bytes(mask), "path": None})
            r["mask_source"].append(source)
    return {k: datasets.Dataset.from_dict(v, features=features) for k, v in split_rows.items()}


def _save_prepared(out_dir: Path, splits: dict, skipped, info, beat=lambda: None) -> None:
    """Write a new preparation beside the old one and swap it in (module docstring): both splits and
    skipped.json into a hidden .prepare-* folder, renamed to prepared-<time> when whole, then prepared.json
    naming it (one rename: the commit), then the old preparation is deleted. Raises DiskFull naming the folder
    when the disk fills; the old preparation is then as it was."""
    import datasets

    name = _splits_name(out_dir)
    needed = sum(ds.data.nbytes for ds in splits.values())  # the PNGs, as the arrow files will hold them
    check_space(out_dir, needed, what=f"the new preparation ({needed / MB:,.0f} MB; the old one stays until it is "
                                      "complete)", margin=MB)
    tmp = out_dir / f".prepare-{uuid.uuid4().hex[:8]}"  # hidden: the lock's next holder removes a left-over one
    tmp.mkdir()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" bars for a few MB are noise
    try:
        with disk_errors(out_dir / name, what=f"the new preparation in {out_dir}"):
            for split, ds in splits.items():
                if len(ds):  # an empty split is not saved (datasets cannot load one back): load_prepared makes it
                    ds.save_to_disk(str(tmp / split))
                beat()
            write_json(tmp / "skipped.json", [{"item": n, "reason": r} for n, r in skipped])
        os.replace(tmp, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    info["splits"] = name
    try:
        write_json(out_dir / PREPARED_JSON, info)  # the commit: from here on prepared.json names the new one
    except BaseException:
        if (read_manifest(out_dir) or {}).get("splits") != name:
            shutil.rmtree(out_dir / name, ignore_errors=True)
        raise
    _remove_unused(out_dir, info)


def _splits_name(out_dir: Path) -> str:
    """A new prepared-<time> name in out_dir (a counter added if one of this second exists)."""
    base = SPLITS_PREFIX + time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (out_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _remove_unused(out_dir: Path, info: dict | None) -> None:
    """Delete the preparations prepared.json does not name: other prepared-* folders (an old one, or a new
    one whose commit never came), and the older layout's train/, test/, skipped.json once it names a folder.
    Nothing without a readable prepared.json (then it is unknown what is whole). Call it holding the lock."""
    if info is None or not out_dir.is_dir():
        return
    keep = info.get("splits")
    for p in out_dir.iterdir():
        unused = (p.name.startswith(SPLITS_PREFIX) and p.is_dir() and p.name != keep) or (keep and p.name in _OLD_LAYOUT)
        if unused:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def read_manifest(out_dir) -> dict | None:
    """A prepared folder's prepared.json (what was prepared from what), or None when there is none or it
    cannot be read (an incomplete folder)."""
    try:
        return json.loads((Path(out_dir) / PREPARED_JSON).read_text())
    except (OSError, ValueError):
        return None


def load_prepared(out_dir) -> PreparedData:
    """Read what prepare_dataset saved in out_dir (no recomputation). FileNotFoundError when there is no
    prepared.json; PreparedDataDamaged, naming the file, when a file it names cannot be read. Readers take no
    lock: a preparation swapped in while this one read (its old folder deleted) is read again, once."""
    out_dir = Path(out_dir)
    for again in (True, False):
        info = read_manifest(out_dir)
        if info is None and (out_dir / PREPARED_JSON).exists():
            raise PreparedDataDamaged(f"{out_dir / PREPARED_JSON} cannot be read as JSON (a cut copy?). To prepare "
                                      "the folder again, rerun notebook 01 (prepare_dataset(source, folder, ...)).")
        if info is None:
            raise FileNotFoundError(f"{out_dir}: no prepared data here ({PREPARED_JSON} is missing); run prepare_dataset")
        try:
            return _read_splits(out_dir, info)
        except PreparedDataDamaged:
            if not again or read_manifest(out_dir) == info:
                raise


def _read_splits(out_dir: Path, info: dict) -> PreparedData:
    import datasets

    splits_name = str(info.get("splits", ""))  # "": the older layout, splits beside prepared.json
    base = out_dir / splits_name
    where = base / "skipped.json"
    try:
        if splits_name and (Path(splits_name).name != splits_name or not splits_name.startswith(SPLITS_PREFIX)):
            raise ValueError(f'"splits" in {PREPARED_JSON} must name a {SPLITS_PREFIX}* folder in it, not {splits_name!r}')
        skipped = [(r["item"], r["reason"]) for r in json.loads(where.read_text())]
        splits = {}
        for name in ("train", "test"):
            where = base / name
            if info["counts"][name] == 0:
                features = _features(with_masks=_has_user_masks(info))
                splits[name] = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
            else:
                splits[name] = datasets.load_from_disk(str(where))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreparedDataDamaged(
            f"{out_dir} holds prepared data that cannot be read: {where}: {type(e).__name__}: {e}. A file there is "
            "cut or missing (an interrupted copy, a full disk). To prepare it again, rerun notebook 01 (or call "
            f"prepare_dataset({str(info.get('source'))!r}, {str(out_dir)!r}, resolution={info.get('resolution')}, "
            f"test_fraction={info.get('test_fraction')}), the source and settings it was prepared with); "
            "or restore the folder from a copy.") from e
    return PreparedData(train=splits["train"], test=splits["test"], skipped=skipped, out_dir=out_dir, info=info)


# --------------------------------------------------------------------------------------------------
# The prepared folder as the contract between the notebooks
# --------------------------------------------------------------------------------------------------

def _is_trace(p: Path) -> bool:
    """Whether p is something a preparation or a feature cache leaves in a prepared folder."""
    n = p.name
    return (n in _OLD_LAYOUT or n.startswith(SPLITS_PREFIX) or n.endswith(".safetensors")
            or (n.startswith(".") and any(m in n for m in TEMPORARY_MARKERS)))


def use_prepared(data_dir, profile, *, dataset=None, resolution: int | None = None,
                 test_fraction: float | None = None, announce: bool = True, progress: bool = True) -> PreparedData:
    """The prepared data in data_dir (notebook 01's output), as notebooks 03-05 and the CLIs read it.

    data_dir holds prepared data: it is used as it is, whatever its source (the profile's dataset or your own
    images). Each setting given here (not None) must be the one it was prepared with, else
    PreparedDataMismatch says what the folder holds, what was asked and how to go on; nothing is re-prepared.
    data_dir holds none: it is prepared now, as notebook 01 does, from `dataset` (else profile.dataset) with
    the given values (else the profile's), and that is said (announce=True prints one line).
    A folder that holds other files but no prepared.json (e.g. a folder of your images) is refused, and so is
    one that shows traces of a preparation but no prepared.json (split folders, a feature cache, a temporary
    left by an interrupted one): it may have held your own data. A folder that another writer is preparing
    right now raises FolderInUse. A folder whose files cannot be read raises PreparedDataDamaged naming them.
    """
    data_dir = Path(data_dir)
    if not (data_dir / PREPARED_JSON).is_file():
        _refuse_strangers(data_dir)
        with FolderLock(data_dir, "preparing data", clean=False):  # no temporary removed before it is reported
            if not (data_dir / PREPARED_JSON).is_file():  # else another writer finished it while this one waited
                _refuse_traces(data_dir)
                source = profile.dataset if dataset is None else dataset
                res = profile.resolution if resolution is None else resolution
                frac = profile.test_fraction if test_fraction is None else test_fraction
                if announce:
                    print(f"No prepared data in {data_dir} (notebook 01 has not run for this output folder): "
                          f"preparing it now from {source} at {res} px, test fraction {frac}, as notebook 01 does.")
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


def _refuse_strangers(data_dir: Path) -> None:
    """PreparedDataMismatch when a folder without prepared.json holds files no preparation writes."""
    strangers = sorted(p.name for p in data_dir.iterdir() if not p.name.startswith(".")
                       and not _is_trace(p)) if data_dir.is_dir() else []
    if strangers:
        raise PreparedDataMismatch(
            f"{data_dir} is not a prepared data folder (no prepared.json) but holds other files "
            f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}). If these are your images, "
            "give that folder as the dataset to notebook 01 (DATASET) or prepare_dataset, and let it write "
            "the prepared data to another folder.")


def _refuse_traces(data_dir: Path) -> None:
    """PreparedDataMismatch when a folder without prepared.json shows traces of a preparation (call it holding
    the folder's lock: then every temporary there is left over, not being written)."""
    traces = sorted(p.name for p in data_dir.iterdir() if _is_trace(p)) if data_dir.is_dir() else []
    if traces:
        raise PreparedDataMismatch(
            f"{data_dir} holds no prepared.json but traces of an earlier preparation "
            f"({', '.join(traces[:4])}{', ...' if len(traces) > 4 else ''}): one that was interrupted, or whose "
            "prepared.json was removed. It may have held your own data, so the profile's dataset is not prepared "
            "over it. To prepare your own data there, rerun notebook 01 with your DATASET (prepare_dataset "
            "replaces these); to use the profile's dataset there, delete these (or the folder) and run again.")


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
