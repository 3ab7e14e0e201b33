"""Each drawing's character mask: the user's own where given, else CLIPSeg's from its caption's subject words.

    seg = load_segmenter(profile.segmenter)                          # CLIPSeg: processor + model; .name
    probs = segment_probabilities(images, prompts, segmenter=seg)    # float32 [N, H, W]
    masks = segment(images, prompts, segmenter=seg, threshold=0.5)   # bool [N, H, W]
    latent = to_latent(masks)                                        # float32 [N, H/8, W/8]: share of each 8x8 block
    picture = fill_background(image, mask)                           # the background painted a flat white
    masks = prepare_masks(prep, profile)       # every row of train and test, made once and stored (notebook 01)
    masks = load_masks(prep)                   # what notebook 01 stored; MasksError when missing or stale
    masks.image("train", row_id), masks.latent(...), masks.source(...), masks.coverage("test")

Where a row's mask comes from (`Masks.source`), the first that applies:
    "masks folder"  a same-named file in the MASKS folder (prepare_dataset(masks=...)), read with its image
    "alpha"         the source image's alpha channel, read before the image is composited on white
    "segmenter"     CLIPSeg prompted with the caption's subject words (helpers.data.subjects, one rule; a
                    caption naming none gets MASK_SUBJECT_DEFAULT, "a cartoon character")
The first two are kept by helpers.data.prepare, cropped and resized as their images.

CLIPSeg (CIDAS/clipseg-rd64-refined): the processor resizes each image to a square (352 px, bilinear) and
normalises it with ImageNet's mean and std; the model gives logits at that size. The mask is
    p = resize_bilinear(sigmoid(logits), image size)      mask = p > threshold     (profile.mask_threshold)
The processor's image part is transformers' ViTImageProcessorPil, named explicitly, as for DINO
(helpers.evaluate.metrics): the default class needs torchvision on transformers 5.15 (Colab) and resizes
with it where installed, and the PIL class gives the same pixels everywhere.

Stored in the prepared folder as `masks.safetensors` (MASKS_FILE): its tensors and metadata, and Masks, the
object a row's mask is read back from, are in helpers.data.mask_file; the data fingerprint and the segmenter's
stamp come from helpers.data.fingerprints. A file whose fingerprint differs (another segmenter, threshold, data
or prompt rule) is rebuilt, and one line says what changed. It is written beside the old one and renamed over it
(helpers.support.atomic) while the folder's lock is held (helpers.support.lock), after checking the disk has room
(helpers.support.disk).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..support.atomic import replacing
from ..support.disk import check_space
from ..support.lock import FolderLock
from ..support.loading import loading
from .fingerprints import data_fingerprint, model_stamp
from .mask_file import FROM_SEGMENTER, SPLITS, Masks, read_masks, try_read_masks, what_changed
from .prepared_folder import PreparedData
from .subjects import MASK_SUBJECT_DEFAULT, subject_of

MASKS_FILE = "masks.safetensors"
MASKS_VERSION = "1"  # bump when masks would come out different, so old files are rebuilt
LATENT_FACTOR = 8  # the VAE's downsampling
DEFAULT_THRESHOLD = 0.5  # on the sigmoid probability (profile.mask_threshold)
NEARLY_EMPTY, NEARLY_FULL = 0.02, 0.9  # coverage that deserves a look: a mask of almost nothing, or of everything


class MasksError(RuntimeError):
    """Masks that cannot be used (missing, stale, damaged); the message names the file and what to do."""


class MasksMissing(MasksError, FileNotFoundError):
    """No masks file in the prepared folder."""


# --------------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------------

@dataclass
class Segmenter:
    """A loaded CLIPSeg: `processor` (CLIPSegProcessor), `model` (CLIPSegForImageSegmentation, eval mode) and
    `name` (the Hub id or folder it came from)."""

    name: str
    processor: object
    model: object

    @property
    def device(self):
        return next(self.model.parameters()).device

    def logits(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """float32 torch [B, S, S] on the model's device: CLIPSeg's logits for each (image, prompt) pair, S its
        processor's size."""
        import torch

        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=list(prompts), images=[im.convert("RGB") for im in images], padding=True,
                                truncation=True, max_length=max_length, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            logits = self.model(**inputs).logits
        return logits.float().reshape(len(images), *logits.shape[-2:])  # older versions squeezed a batch of one


def load_segmenter(segmenter, device=None, dtype=None) -> Segmenter:
    """A Segmenter from a Hub id or folder (profile.segmenter); a Segmenter is returned as it is. Runs on the
    GPU in fp16 when there is one, else the CPU in fp32 (helpers.support.device), unless told otherwise.
    A failed load raises helpers.support.loading.LoadError naming the id and what to do."""
    if isinstance(segmenter, Segmenter):
        return segmenter
    from transformers import CLIPSegForImageSegmentation

    from ..support.device import default_device_dtype

    device, dtype = default_device_dtype(device, dtype)
    name = str(segmenter)
    with loading("segmenter (a transformers CLIPSeg with its processor files)", name):
        processor = segmenter_processor(name)
        model = CLIPSegForImageSegmentation.from_pretrained(name, dtype=dtype)
    return Segmenter(name, processor, model.to(device).eval())


def segmenter_processor(name: str):
    """CLIPSeg's processor for `name` (Hub id or folder): its tokenizer, and its image files read by
    ViTImageProcessorPil (module docstring); images -> `pixel_values` float32 [N, 3, S, S]."""
    from transformers import AutoTokenizer, CLIPSegProcessor, ViTImageProcessorPil

    return CLIPSegProcessor(image_processor=ViTImageProcessorPil.from_pretrained(name),
                            tokenizer=AutoTokenizer.from_pretrained(name))


def _same_size(images) -> tuple[int, int]:
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"segment: the images must share one size (the prepared resolution), got {sorted(sizes)}")
    w, h = sizes.pop()
    return h, w


def segment_probabilities(images: Sequence[Image.Image], prompts: Sequence[str], *, segmenter,
                          batch_size: int = 8) -> np.ndarray:
    """float32 [N, H, W]: sigmoid(CLIPSeg's logits) for each (image, prompt), resized bilinearly to the images'
    size (H, W; all images one size). `segmenter`: a Segmenter, or a Hub id or folder to load."""
    import torch.nn.functional as F

    if len(images) != len(prompts):
        raise ValueError(f"segment: {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    if not len(images):
        return np.zeros((0, 0, 0), np.float32)
    seg = load_segmenter(segmenter)
    h, w = _same_size(images)
    out = np.empty((len(images), h, w), np.float32)
    for s in range(0, len(images), batch_size):
        probs = seg.logits(images[s:s + batch_size], prompts[s:s + batch_size]).sigmoid()  # [B, S, S]
        out[s:s + batch_size] = F.interpolate(probs[:, None], size=(h, w), mode="bilinear",
                                              align_corners=False)[:, 0].cpu().numpy()
    return out


def segment(images: Sequence[Image.Image], prompts: Sequence[str], *, segmenter, threshold: float = DEFAULT_THRESHOLD,
            batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """bool [N, H, W]: segment_probabilities(...) > threshold, batch by batch (a progress bar if asked)."""
    from tqdm.auto import tqdm

    if not len(images):
        return np.zeros((0, 0, 0), bool)
    seg = load_segmenter(segmenter)
    h, w = _same_size(images)
    out = np.empty((len(images), h, w), bool)
    for s in tqdm(range(0, len(images), batch_size), desc="segmenting", unit="batch", disable=not progress):
        out[s:s + batch_size] = segment_probabilities(images[s:s + batch_size], prompts[s:s + batch_size],
                                                      segmenter=seg, batch_size=batch_size) > threshold
    return out


def mask_prompt(caption: str) -> str:
    """CLIPSeg's prompt for an image: its caption's subject words, MASK_SUBJECT_DEFAULT when it names none."""
    return subject_of(caption, default=MASK_SUBJECT_DEFAULT)


# --------------------------------------------------------------------------------------------------
# What training and the scores do with a mask
# --------------------------------------------------------------------------------------------------

def to_latent(mask: np.ndarray, factor: int = LATENT_FACTOR) -> np.ndarray:
    """bool or float [N, H, W] (or [H, W]) -> float32 [N, H/f, W/f]: the mean of each f x f block (the share of
    the block on the character), the mask at the VAE latents' size. H and W must be multiples of f."""
    m = np.asarray(mask, dtype=np.float32)
    h, w = m.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"to_latent: a {h}x{w} mask does not split into {factor}x{factor} blocks")
    return m.reshape(*m.shape[:-2], h // factor, factor, w // factor, factor).mean(axis=(-3, -1))


def fill_background(image: Image.Image, mask: np.ndarray, fill=(255, 255, 255)) -> Image.Image:
    """The image (RGB) with every pixel off the mask (bool [H, W], the image's size) set to `fill` exactly."""
    rgb = np.asarray(image.convert("RGB"))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"fill_background: a {mask.shape[1]}x{mask.shape[0]} mask for a {image.width}x{image.height} image")
    return Image.fromarray(np.where(mask[..., None], rgb, np.asarray(fill, np.uint8)).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------------
# Every row's mask, stored with the prepared data
# --------------------------------------------------------------------------------------------------

def _plan(prep: PreparedData) -> dict[str, dict]:
    """Per split: ids, sources, prompts (None for user masks) and the user masks (bool [R, R] or None)."""
    plan = {}
    for name in SPLITS:
        split = getattr(prep, name)
        user = "mask" in split.column_names
        sources = list(split["mask_source"]) if user else [None] * len(split)
        texts = list(split["text"])
        sources = [s or FROM_SEGMENTER for s in sources]
        plan[name] = {"ids": list(split["id"]), "sources": sources,
                      "prompts": [mask_prompt(t) if s == FROM_SEGMENTER else None for t, s in zip(texts, sources)],
                      "user": user}
    return plan


def masks_fingerprint(prep: PreparedData, segmenter: str, threshold: float, plan=None) -> dict[str, str]:
    """The metadata a masks file made now would carry; its "fingerprint" decides reuse."""
    plan = plan or _plan(prep)
    prompts = hashlib.sha256(json.dumps([plan[s]["prompts"] for s in SPLITS]).encode()).hexdigest()
    parts = {"format": "ipa-masks", "version": MASKS_VERSION, "segmenter": str(segmenter),
             "segmenter_stamp": model_stamp(str(segmenter)), "threshold": repr(float(threshold)),
             "resolution": str(prep.info.get("resolution")), "data": data_fingerprint(prep), "prompts": prompts}
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    for s in SPLITS:
        parts.update({f"{s}/ids": json.dumps(plan[s]["ids"]), f"{s}/sources": json.dumps(plan[s]["sources"]),
                      f"{s}/prompts": json.dumps(plan[s]["prompts"])})
    return parts


def prepare_masks(prep: PreparedData, profile_or_segmenter, *, threshold: float | None = None, batch_size: int = 8,
                  device=None, progress: bool = True) -> Masks:
    """The masks of EVERY row of prep.train and prep.test, stored in prep.out_dir/masks.safetensors (module
    docstring), made now or read back when the file's fingerprint matches (no model loaded then).

    profile_or_segmenter: a Profile (its segmenter and mask_threshold), a Hub id or folder, or a Segmenter.
    threshold: on the sigmoid probability; None: the profile's, else DEFAULT_THRESHOLD.
    Rows with a user mask (the prepared mask column) keep it; the others are segmented with mask_prompt(caption).
    A file made with another segmenter, threshold or data is replaced, and one line says so. Raises FolderInUse
    when another writer holds the folder, DiskFull (naming the file) when the disk is full, LoadError when the
    segmenter cannot be loaded; the old file stays in each case.
    """
    if isinstance(profile_or_segmenter, (str, Path, Segmenter)):
        segmenter = profile_or_segmenter
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    else:
        segmenter = profile_or_segmenter.segmenter
        threshold = profile_or_segmenter.mask_threshold if threshold is None else threshold
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a probability in [0, 1), got {threshold}")
    name = segmenter.name if isinstance(segmenter, Segmenter) else str(segmenter)
    path = Path(prep.out_dir) / MASKS_FILE
    plan = _plan(prep)
    meta = masks_fingerprint(prep, name, threshold, plan)
    old = try_read_masks(path)
    if old is not None and old.meta.get("fingerprint") == meta["fingerprint"]:
        return old
    with FolderLock(prep.out_dir, "making masks") as lock:
        old = try_read_masks(path)
        if old is not None and old.meta.get("fingerprint") == meta["fingerprint"]:  # made while this one waited
            return old
        if old is not None:
            print(f"{path} was made with segmenter {old.meta.get('segmenter')} at threshold "
                  f"{old.meta.get('threshold')}; {what_changed(old.meta, meta)}: making the masks again.")
        if any(FROM_SEGMENTER in plan[s]["sources"] for s in SPLITS):  # loaded only when a row needs it
            segmenter = load_segmenter(segmenter, device)
        arrays = {}
        for split in SPLITS:
            image = _split_masks(getattr(prep, split), plan[split], segmenter, threshold, batch_size, progress,
                                 prep.info.get("resolution"))
            arrays[f"{split}/image"] = image.astype(np.uint8)
            arrays[f"{split}/latent"] = to_latent(image).astype(np.float16)
            lock.beat()
        needed = sum(a.nbytes for a in arrays.values())
        check_space(path.parent, needed, what=f"the masks {path}")
        from safetensors.numpy import save_file

        with replacing(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    return read_masks(path)


def _split_masks(split, plan: dict, segmenter, threshold, batch_size, progress, resolution) -> np.ndarray:
    """bool [N, R, R]: the user masks of the split where it has them, the segmenter's (a loaded Segmenter) for
    the other rows."""
    r = int(resolution)
    out = np.zeros((len(split), r, r), bool)
    todo = [i for i, s in enumerate(plan["sources"]) if s == FROM_SEGMENTER]
    if plan["user"]:
        for i, m in enumerate(split["mask"]):
            if m is not None:
                out[i] = np.asarray(m.convert("L")) >= 128
    if todo:
        images = [split[i]["image"] for i in todo]
        out[todo] = segment(images, [plan["prompts"][i] for i in todo], segmenter=segmenter, threshold=threshold,
                            batch_size=batch_size, progress=progress)
    return out


def load_masks(prep: PreparedData, *, segmenter: str | None = None, threshold: float | None = None) -> Masks:
    """What prepare_masks stored for this preparation. Raises MasksMissing when there is no file, MasksError
    when it cannot be read or was made for other data (the data was prepared again since), or, when
    `segmenter` / `threshold` are given, with others; each names the file and says to run notebook 01's mask
    cell (prepare_masks(prep, profile)) again."""
    path = Path(prep.out_dir) / MASKS_FILE
    again = (f"Run notebook 01's mask cell (section 6: prepare_masks(prep, profile)) for the data in {prep.out_dir}, "
             "then run this again.")
    if not path.is_file():
        raise MasksMissing(f"{path}: no masks here. Notebook 01's mask cell makes every row's mask once. {again}")
    try:
        masks = read_masks(path)
    except Exception as e:  # noqa: BLE001  (a cut or foreign file: say so, with the way out)
        raise MasksError(f"{path} cannot be read as masks ({type(e).__name__}: {e}). {again}") from e
    meta = masks.meta
    if meta.get("version") != MASKS_VERSION or meta.get("resolution") != str(prep.info.get("resolution")) \
            or meta.get("data") != data_fingerprint(prep):
        raise MasksError(f"{path} holds the masks of other data: the data in {prep.out_dir} was prepared again after "
                         f"the masks were made (or by another version). {again}")
    if segmenter is not None and str(segmenter) != meta.get("segmenter"):
        raise MasksError(f"{path} was made with the segmenter {meta.get('segmenter')}, this run asks for {segmenter}. {again}")
    if threshold is not None and float(threshold) != masks.threshold:
        raise MasksError(f"{path} was made at threshold {masks.threshold:g}, this run asks for {threshold:g}. {again}")
    return masks
