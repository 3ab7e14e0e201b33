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

On disk: prepared.json naming a prepared-<time>/ folder with both splits and skipped.json, the feature cache
and the masks beside them; a new preparation is written beside the old one and replaces it by one rename of
prepared.json, so the folder always holds one whole preparation (helpers.data.prepared_folder).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..support.lock import FolderLock
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
from .prepared_folder import (
    FROM_ALPHA,
    FROM_MASKS_FOLDER,
    PREPARED_JSON,
    SPLITS_PREFIX,
    PreparedData,
    has_user_masks,
    is_trace,
    read_manifest,
    remove_unused,
    save_prepared,
    split_features,
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

# bump when prepared data would come out different, so old folders are rebuilt. 2: distances symmetric (either
# image mirrored); 3: the user's own masks kept (alpha channel, masks folder)
PREPARED_VERSION = "3"
DATA_SEED = 0  # the split seed prepare_for_training uses (notebook 01 uses the same, so training reuses its work)


class PreparedDataMismatch(ValueError):
    """A prepared data folder that holds other data than asked for; the message says what to do."""


class PreparedDataDamaged(PreparedDataMismatch):
    """A prepared data folder whose files cannot be read (a cut or missing split file); the message names the
    file and says to rerun notebook 01. A PreparedDataMismatch, so every caller that reports one reports this."""


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
        remove_unused(out_dir, before)
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
    save_prepared(out_dir, _split_rows(kept, texts, origins, groups, hashes, is_test, user_masks), skipped, info, beat)
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

    features = split_features(with_masks=any(s is not None for _, s in user_masks))
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
                features = split_features(with_masks=has_user_masks(info))
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
                       and not is_trace(p)) if data_dir.is_dir() else []
    if strangers:
        raise PreparedDataMismatch(
            f"{data_dir} is not a prepared data folder (no prepared.json) but holds other files "
            f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}). If these are your images, "
            "give that folder as the dataset to notebook 01 (DATASET) or prepare_dataset, and let it write "
            "the prepared data to another folder.")


def _refuse_traces(data_dir: Path) -> None:
    """PreparedDataMismatch when a folder without prepared.json shows traces of a preparation (call it holding
    the folder's lock: then every temporary there is left over, not being written)."""
    traces = sorted(p.name for p in data_dir.iterdir() if is_trace(p)) if data_dir.is_dir() else []
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
