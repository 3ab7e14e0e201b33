"""The sampling panel's reference mask: which mask a reference gets, and the preview drawn with it.

helpers.sample.widgets.SamplingPanel inherits MaskView (as diffusers' pipelines inherit their loader mixins): its
plain methods `mask_words`, `reference_mask` and `preview_image` are the panel's, and read the panel's widgets and
references (the attributes MaskView's docstring lists).

The reference's mask (the character, True; helpers.data.masks): "show mask" lays it over the preview, and
"background removed" paints everything off it white before the image encoder sees the reference, for every
ticked model (generate's `masks`; each Sample says background="removed"). Which mask:
    a test-split reference   notebook 01's stored mask (`masks=load_masks(prep)`), else CLIPSeg now on its
                             caption's subject words, as notebook 01 makes it (helpers.data.masks.mask_prompt)
    your own image           CLIPSeg now on the Concept box's words, else the prompt's subject words
                             (helpers.data.subjects.subject_of, "a cartoon character" when it names none)
Segmented masks are kept per reference and words; the segmenter (the profile's) loads on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..data.masks import fill_background, load_segmenter, mask_prompt, segment
from ..data.subjects import MASK_SUBJECT_DEFAULT, subject_of
from .uploads import UPLOAD_PREFIX


class MaskView:
    """The reference mask's part of the panel (see the module docstring).

    Reads from the panel: references ({id: PIL image}), captions ({id: caption}), bank (its device), and the
    widgets reference (Dropdown), prompt and concept (Text), show_mask and remove_background (Checkbox).
    Keeps: masks, segmenter (loaded on first use), threshold, last_mask, last_mask_source.
    """

    def _init_masks(self, masks, segmenter, threshold: float) -> None:
        """masks: notebook 01's stored masks (helpers.data.masks.load_masks) or None; segmenter (Hub id, folder or
        loaded Segmenter) and threshold: what segments the references that have none."""
        self.masks = masks
        self.segmenter = segmenter
        self.threshold = float(threshold)
        self._segmented: dict[tuple[str, str], np.ndarray] = {}  # (reference id, words) -> bool [H, W]
        self.last_mask: np.ndarray | None = None
        self.last_mask_source: str = ""

    def mask_words(self, ref_id: str | None = None) -> str:
        """The words CLIPSeg is prompted with for a reference (default: the current one) that has no stored
        mask: its caption's subject words for a test-split reference (as notebook 01), the Concept box's words
        or else the prompt's subject words for your own image (the module docstring)."""
        ref_id = self.reference.value if ref_id is None else ref_id
        if not str(ref_id).startswith(UPLOAD_PREFIX):
            return mask_prompt(self.captions.get(ref_id, ""))
        return self.concept.value.strip() or subject_of(self.prompt.value, default=MASK_SUBJECT_DEFAULT)

    def _stored(self, ref_id: str) -> bool:
        return self.masks is not None and ref_id in self.masks.ids["test"]

    def _mask_how(self, ref_id: str) -> str:
        """Where the reference's mask comes from, in words (without computing it)."""
        if self._stored(ref_id):
            return f"stored by notebook 01 ({self.masks.source('test', ref_id)})"
        return f"{_name(self.segmenter)} on {self.mask_words(ref_id)!r}, threshold {self.threshold:g}"

    def reference_mask(self, ref_id: str | None = None) -> np.ndarray:
        """bool [H, W] at the reference's size, True on the character: the stored mask of a test-split
        reference, else CLIPSeg's now (module docstring; kept per reference and words). Also kept in
        last_mask, and where it came from in last_mask_source."""
        ref_id = self.reference.value if ref_id is None else ref_id
        if ref_id not in self.references:
            raise ValueError("no reference image: pick a test image or upload one")
        image = self.references[ref_id]
        if self._stored(ref_id):
            mask = self.masks.image("test", ref_id)
            if mask.shape != (image.height, image.width):
                raise ValueError(f"{self.masks.path}: the stored mask of {ref_id} is {mask.shape[1]}x{mask.shape[0]}, "
                                 f"the reference {image.width}x{image.height}: load the masks of the data the "
                                 "references came from (load_masks(prep) on the same prepared folder)")
        else:
            key = (ref_id, self.mask_words(ref_id))
            if key not in self._segmented:
                self.segmenter = load_segmenter(self.segmenter, device=self.bank.device)  # once: then it is loaded
                self._segmented[key] = segment([image], [key[1]], segmenter=self.segmenter,
                                               threshold=self.threshold)[0]
            mask = self._segmented[key]
        self.last_mask, self.last_mask_source = mask, self._mask_how(ref_id)
        return mask

    def preview_image(self, ref_id: str | None = None) -> Image.Image:
        """What the preview shows: the reference, painted white off its mask when "background removed" is
        ticked (what the adapters will see), with the mask laid over it when "show mask" is (the background
        tinted magenta)."""
        ref_id = self.reference.value if ref_id is None else ref_id
        image = self.references[ref_id]
        if not (self.show_mask.value or self.remove_background.value):
            return image
        mask = self.reference_mask(ref_id)
        if self.remove_background.value:
            image = fill_background(image, mask)
        return _overlay(image, mask) if self.show_mask.value else image


def _name(segmenter) -> str:
    """A segmenter's name: a loaded Segmenter's .name, a Hub id's or folder's last part."""
    return Path(str(getattr(segmenter, "name", segmenter))).name


def _overlay(image: Image.Image, mask: np.ndarray, tint=(255, 0, 160), alpha: float = 0.6) -> Image.Image:
    """The image with the pixels off the mask (bool [H, W]) blended `alpha` of the way to `tint`."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    off = (1 - alpha) * rgb + alpha * np.asarray(tint, np.float32)
    return Image.fromarray(np.where(np.asarray(mask, bool)[..., None], rgb, off).round().astype(np.uint8), "RGB")
