"""What a file stored in the prepared folder was made from, so that it is reused exactly while nothing changed.

    model_stamp("runwayml/stable-diffusion-v1-5")   # "hub:<id>@<commit>"; a local folder: "local:<path>:<files>"
    split_fingerprint(prep.train)                   # sha256 hex over (id, image bytes, caption) of every row
    data_fingerprint(prep)                          # the same over both splits, with the user masks
    holds(path, {"fingerprint": ...})               # whether a .safetensors file carries these metadata values

The feature cache (helpers.data.features) and the masks (helpers.data.masks) write these stamps and fingerprints
into their files' metadata and compare them before reusing a file: a model is named by its local files (their
paths, sizes and modification times, helpers.data.sources.files_stamp) or its Hub commit, the data by the bytes
of its rows, so a file is rebuilt exactly when a model or a row changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .sources import files_stamp


def hub_revision(repo: str) -> str:
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


def model_stamp(spec) -> str:
    """What a model (Hub id, folder or file; None: the default) is now: "default", "local:<path>:<files_stamp>"
    (an adapter file with an image_encoder/ folder beside it: that folder's too) or "hub:<spec>@<commit>"."""
    if spec is None:
        return "default"
    p = Path(str(spec)).expanduser()
    if p.exists():
        stamp = f"local:{p.resolve()}:{files_stamp(p)}"
        if p.is_file() and (p.parent / "image_encoder").is_dir():  # the default image encoder of an adapter file
            stamp += f"+image_encoder:{files_stamp(p.parent / 'image_encoder')}"
        return stamp
    repo = "/".join(str(spec).split("/")[:2])
    return f"hub:{spec}@{hub_revision(repo)}"


def _raw_rows(split, columns):
    """The split's `columns`, with image and mask as stored ({"bytes", "path"}), not decoded."""
    import datasets

    raw = split.select_columns(columns)
    for c in ("image", "mask"):
        if c in columns:
            raw = raw.cast_column(c, datasets.Image(decode=False))
    return raw


def _bytes(value) -> bytes:
    if not value:
        return b""
    return value["bytes"] if value.get("bytes") else Path(value["path"]).read_bytes()


def split_fingerprint(split) -> str:
    """sha256 over (id, image bytes, caption) of every row of one split, in order (the feature cache's data)."""
    h = hashlib.sha256()
    for batch in _raw_rows(split, ["id", "image", "text"]).iter(batch_size=64):
        for id_, image, text in zip(batch["id"], batch["image"], batch["text"]):
            data = _bytes(image)
            h.update(f"{id_}\0{len(data)}\0".encode())
            h.update(data)
            h.update(f"\0{text}\n".encode())
    return h.hexdigest()


def data_fingerprint(prep) -> str:
    """sha256 over every row of both splits of a PreparedData: split, id, image bytes, caption, user mask bytes
    and source (the masks' data)."""
    h = hashlib.sha256()
    for name in ("train", "test"):
        split = getattr(prep, name)
        user = "mask" in split.column_names
        raw = _raw_rows(split, ["id", "image", "text"] + (["mask", "mask_source"] if user else []))
        h.update(f"{name}\0{len(split)}\n".encode())
        for batch in raw.iter(batch_size=64):
            for i, id_ in enumerate(batch["id"]):
                image, mask = _bytes(batch["image"][i]), _bytes(batch["mask"][i]) if user else b""
                h.update(f"{id_}\0{len(image)}\0".encode() + image)
                h.update(f"\0{batch['text'][i]}\0{len(mask)}\0".encode() + mask)
                h.update(f"\0{batch['mask_source'][i] if user else None}\n".encode())
    return h.hexdigest()


def holds(path: Path, meta: dict[str, str]) -> bool:
    """Whether the safetensors file at path exists, can be read, and carries these metadata values."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            old = f.metadata() or {}
        return all(old.get(k) == v for k, v in meta.items())
    except Exception:  # noqa: BLE001  (a damaged file is simply rebuilt)
        return False
