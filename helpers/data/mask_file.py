"""The stored masks file: its layout, and Masks, the object a row's mask is read back from.

    masks = read_masks(path)          # a Masks; ValueError when it is not a masks file
    masks.image("train", row_id), masks.latent(...), masks.source(...), masks.coverage("test"), masks.summary()

helpers.data.masks makes the file (prepare_masks) and checks it against the prepared data (load_masks); this
module only reads it. In the prepared folder, `masks.safetensors` (rows in each split's order, R the resolution):
    "{split}/image"   uint8 [N, R, R], 1 on the character
    "{split}/latent"  float16 [N, R/8, R/8], the image mask averaged over 8x8 blocks (helpers.data.masks.to_latent)
    metadata: format, version, segmenter (name and stamp: its files or Hub revision), threshold, resolution,
              the data fingerprint (id, image, caption, user mask of every row; helpers.data.fingerprints) and the
              prompts' hash, and per split the ids, sources and prompts (JSON lists)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .prepared_folder import FROM_ALPHA, FROM_MASKS_FOLDER

FROM_SEGMENTER = "segmenter"  # a row's mask source when CLIPSeg made it (the user's: helpers.data.prepared_folder)
SOURCES = (FROM_MASKS_FOLDER, FROM_ALPHA, FROM_SEGMENTER)
SPLITS = ("train", "test")


@dataclass
class Masks:
    """The masks of every row of a preparation (prepare_masks, load_masks). Rows are named by split ("train",
    "test") and row id; arrays follow each split's order."""

    path: Path
    meta: dict[str, str]
    arrays: dict[str, np.ndarray]  # "{split}/image" uint8 [N, R, R], "{split}/latent" float16 [N, R/8, R/8]

    def __post_init__(self):
        self.ids = {s: json.loads(self.meta[f"{s}/ids"]) for s in SPLITS}
        self.sources = {s: json.loads(self.meta[f"{s}/sources"]) for s in SPLITS}
        self.prompts = {s: json.loads(self.meta[f"{s}/prompts"]) for s in SPLITS}  # None where not segmented
        self._rows = {s: {r: i for i, r in enumerate(ids)} for s, ids in self.ids.items()}

    @property
    def segmenter(self) -> str:
        return self.meta["segmenter"]

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def index(self, split: str, row_id: str) -> int:
        if split not in self._rows:
            raise KeyError(f"no split {split!r} in {self.path}: the splits are {', '.join(SPLITS)}")
        if row_id not in self._rows[split]:
            raise KeyError(f"{self.path} has no mask for row {row_id!r} of {split}; the masks were made for other "
                           "data: run notebook 01's mask cell again")
        return self._rows[split][row_id]

    def images(self, split: str) -> np.ndarray:
        """bool [N, R, R], the split's rows in order."""
        return self.arrays[f"{split}/image"].astype(bool)

    def latents(self, split: str) -> np.ndarray:
        """float32 [N, R/8, R/8], the split's rows in order."""
        return self.arrays[f"{split}/latent"].astype(np.float32)

    def image(self, split: str, row_id: str) -> np.ndarray:
        """bool [R, R]: the row's mask at the image's size, True on the character."""
        return self.arrays[f"{split}/image"][self.index(split, row_id)].astype(bool)

    def latent(self, split: str, row_id: str) -> np.ndarray:
        """float32 [R/8, R/8]: the row's mask at the latents' size (to_latent)."""
        return self.arrays[f"{split}/latent"][self.index(split, row_id)].astype(np.float32)

    def source(self, split: str, row_id: str) -> str:
        """Where the row's mask came from: "masks folder", "alpha" or "segmenter"."""
        return self.sources[split][self.index(split, row_id)]

    def prompt(self, split: str, row_id: str) -> str | None:
        """The words CLIPSeg was prompted with for the row (None for a user's own mask)."""
        return self.prompts[split][self.index(split, row_id)]

    def coverage(self, split: str) -> np.ndarray:
        """float [N]: the share of each row's pixels on the character, in the split's order."""
        image = self.arrays[f"{split}/image"]
        return image.reshape(len(image), -1).mean(axis=1) if len(image) else np.zeros(0)

    def summary(self) -> str:
        counts = {s: {src: self.sources[s].count(src) for src in SOURCES if src in self.sources[s]} for s in SPLITS}
        return (f"{self.path}: masks of {sum(len(v) for v in self.ids.values())} rows "
                + "; ".join(f"{s} {len(self.ids[s])} ({', '.join(f'{k}: {v}' for k, v in counts[s].items()) or 'none'})"
                            for s in SPLITS)
                + f"; segmenter {self.segmenter}, threshold {self.threshold:g}")


def read_masks(path: Path) -> Masks:
    """The Masks in a masks file; ValueError when the file is not one (safetensors' own error when it is cut)."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != "ipa-masks":
        raise ValueError("not a masks file written by helpers.data.masks.prepare_masks")
    return Masks(path, meta, load_file(str(path)))


def try_read_masks(path: Path) -> Masks | None:
    """read_masks(path), or None when there is no file or it cannot be read (it is then made again)."""
    try:
        return read_masks(path) if path.is_file() else None
    except Exception:  # noqa: BLE001  (a damaged or foreign file is made again)
        return None


def what_changed(old: dict, new: dict) -> str:
    """What differs between an old masks file's metadata and the one a file made now would carry, in words."""
    said = []
    if old.get("segmenter") != new["segmenter"] or old.get("segmenter_stamp") != new["segmenter_stamp"]:
        said.append(f"segmenter {old.get('segmenter')} -> {new['segmenter']}")
    if old.get("threshold") != new["threshold"]:
        said.append(f"threshold {old.get('threshold')} -> {new['threshold']}")
    if old.get("data") != new["data"] or old.get("resolution") != new["resolution"]:
        said.append("the prepared data changed")
    if old.get("prompts") != new["prompts"] and old.get("data") == new["data"]:
        said.append("the prompts changed")
    if old.get("version") != new["version"]:
        said.append(f"format version {old.get('version')} -> {new['version']}")
    return ", ".join(said) or "it changed"
