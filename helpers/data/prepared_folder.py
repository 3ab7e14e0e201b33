"""The prepared folder: what a preparation is, on disk and in memory, and how a new one replaces the old.

    prep = PreparedData(train, test, skipped, out_dir, info)     # what prepare_dataset returns, load_prepared reads
    info = read_manifest(out_dir)                                 # prepared.json, or None (missing, unreadable)
    save_prepared(out_dir, splits, skipped, info)                 # write beside the old one, commit, delete the old
    remove_unused(out_dir, info)                                  # what an interrupted preparation left over
    is_trace(path)                                                # whether a preparation or a cache left it there

helpers.data.prepare decides what goes in (prepare_dataset: the five steps) and which folder a caller gets
(load_prepared, use_prepared); this module is the layout and the swap. On disk (`out_dir`):

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
from dataclasses import dataclass, field
from pathlib import Path

from ..support.atomic import write_json
from ..support.disk import MB, check_space, disk_errors
from ..support.lock import TEMPORARY_MARKERS

PREPARED_JSON = "prepared.json"  # what was prepared from what, and where; replaced last (the commit): it names a whole one
SPLITS_PREFIX = "prepared-"  # prepared-<time>/: one preparation's splits and skipped.json, named by prepared.json
_OLD_LAYOUT = ("train", "test", "skipped.json")  # beside prepared.json, before the prepared-<time> folders
FROM_ALPHA, FROM_MASKS_FOLDER = "alpha", "masks folder"  # a row's mask_source: where its user mask came from


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


def read_manifest(out_dir) -> dict | None:
    """A prepared folder's prepared.json (what was prepared from what), or None when there is none or it
    cannot be read (an incomplete folder)."""
    try:
        return json.loads((Path(out_dir) / PREPARED_JSON).read_text())
    except (OSError, ValueError):
        return None


def split_features(with_masks: bool = False):
    """The datasets.Features of a prepared split: the columns above (mask and mask_source only with_masks)."""
    import datasets

    columns = {
        "id": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string"),
        "caption_source": datasets.Value("string"), "group": datasets.Value("int64"), "hash": datasets.Value("string"),
    }
    if with_masks:
        columns.update({"mask": datasets.Image(), "mask_source": datasets.Value("string")})
    return datasets.Features(columns)


def has_user_masks(info: dict) -> bool:
    """Whether a preparation (prepared.json's contents) kept any user mask: then its splits have mask columns."""
    masks = info.get("user_masks") or {}
    return bool(masks.get(FROM_ALPHA) or masks.get(FROM_MASKS_FOLDER))


def save_prepared(out_dir: Path, splits: dict, skipped, info, beat=lambda: None) -> None:
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
    remove_unused(out_dir, info)


def _splits_name(out_dir: Path) -> str:
    """A new prepared-<time> name in out_dir (a counter added if one of this second exists)."""
    base = SPLITS_PREFIX + time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (out_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def remove_unused(out_dir: Path, info: dict | None) -> None:
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


def is_trace(p: Path) -> bool:
    """Whether p is something a preparation or a feature cache leaves in a prepared folder."""
    n = p.name
    return (n in _OLD_LAYOUT or n.startswith(SPLITS_PREFIX) or n.endswith(".safetensors")
            or (n.startswith(".") and any(m in n for m in TEMPORARY_MARKERS)))
