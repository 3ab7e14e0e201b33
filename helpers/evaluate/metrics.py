"""CLIP-T, CLIP-I and DINO similarity, whole-image and subject-only: per-sample scores for the evaluation
(notebook 05).

    clip_t(images, prompts, clip=...)     cosine(CLIP image embedding, CLIP text embedding), shape (N,)
    clip_i(images, references, clip=...)  cosine(CLIP image embedding, CLIP image embedding), shape (N,)
    dino(images, references, dino=...)    cosine of DINO ViT CLS embeddings (DreamBooth's DINO), shape (N,)
    subject_scores(images, masks, references, reference_masks, clip=..., dino=...)
                                          {clip_i_subject, dino_subject, clip_i_background}: each (N,), the same
                                          cosines on the character alone and on the background alone
    output_masks(images, prompts, segmenter=..., threshold=...)   bool [N, H, W]: each output's character

All three return the *plain cosine* in [-1, 1], one value per (image, prompt) or (image, reference)
pair, the convention of DreamBooth's CLIP-T / CLIP-I and (almost certainly) of the seed project's
"CLIP-T 0.32". torchmetrics' `CLIPScore` reports `max(100 * cosine, 0)` instead; `x100()` converts.
Always name the CLIP model next to a number: scores from different CLIP models are not comparable.

CLIP goes through torchmetrics' own CLIP score code (`_clip_score_update`, wrapped in helpers.support.compat:
processor, features, normalisation), fed by the callable `model_name_or_path` hook of `CLIPScore`. With transformers 5,
`CLIPModel.get_{image,text}_features` return output objects (the projected embedding is in
`.pooler_output`) where torchmetrics expects tensors; `TensorFeatures` is the thin wrapper that fixes
that (and exposes `.config`, which torchmetrics reads). torchmetrics' public `clip_score` / `CLIPScore`
only give the mean over a batch, clamped at 0; the per-sample values come from `_clip_score_update`,
which returns `100 * cosine` for each pair before any averaging or clamping (checked in torchmetrics 1.9).

Images are prepared by transformers' PIL image processors (`CLIPImageProcessorPil`,
`ViTImageProcessorPil`), named explicitly: the default classes resize with torchvision when it is
installed (Colab) and with PIL when not, which gives slightly different pixels, and on transformers 5.15
`AutoImageProcessor` raises ImportError without torchvision. The PIL classes run everywhere and give the
same tensors on every transformers version the requirements admit (tests/evaluate/test_metrics.py checks them
against a hand-written resize and normalisation).

Subject-only scores: whole-image CLIP-I and DINO count the layout and background as much as the
character, so an output that copies the reference's picture scores "consistent" and one that keeps the character
in the prompt's new scene scores "varied". So each image is also scored on its character alone:
    clip_i_subject     CLIP-I of fill(output, m_out) against fill(reference, m_ref)
    dino_subject       DINO of the same two pictures
    clip_i_background  CLIP-I of fill(output, not m_out) against fill(reference, not m_ref): the backgrounds, the
                       characters painted out. A copied picture scores high on it, a kept character in a new
                       scene low, whatever its subject score.
fill(x, m) is helpers.data.masks.fill_background: every pixel off m set to SUBJECT_FILL, white. m_ref is the
reference's stored mask (notebook 01: helpers.data.masks.prepare_masks, a user's own mask where given); m_out
is the output's, from the same segmenter and threshold prompted with the prompt's subject words
(helpers.data.subjects.subject_of, MASK_SUBJECT_DEFAULT when it names none).
Fill, not a crop to the mask's box: a box keeps whatever background lies inside it (most of it, for a character
with its arms out), which is what the score must not see, while a flat fill leaves the character's own pixels
and nothing else. White because notebook 01 composites every drawing on white and training's `MASK=reference`
fills with it, so a reference drawn on white is its own subject picture. What the fill keeps: the character's
size and place in the frame still count, as they do for whole-image CLIP-I.
An empty mask (no pixel on the character, the output's or the reference's) leaves nothing to compare: its
subject scores are NaN (and a full mask's background score), counted and left out of the means
(helpers.evaluate.stats drops NaN per reference).

Models are loaded once per (id, device) and reused (`get_clip`, `get_dino`, `get_segmenter`; `clear_cache()`
frees them); pass a `CLIPScorer` / `DINOScorer` / Segmenter object instead of an id to control that yourself.
Work runs in batches on the GPU when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..data.masks import DEFAULT_THRESHOLD, fill_background, load_segmenter, segment
from ..data.subjects import MASK_SUBJECT_DEFAULT, subject_of
from ..profile import CLIPSEG as DEFAULT_SEGMENTER
from ..profile import DINO as DEFAULT_DINO
from ..profile import EVAL_CLIP as DEFAULT_CLIP
from ..support.compat import clip_score_update
from ..support.device import default_device
from ..support.loading import loading
from .stats import SUBJECT_SCORES  # noqa: F401  (the names subject_scores returns, in results.csv's order)

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


def to_chw_uint8(image: ImageLike) -> torch.Tensor:
    """A PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor -> a (3, H, W) uint8 tensor (CPU).

    Float tensors/arrays are read as [0, 1] and rounded to 8 bits, as a saved PNG would be.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    t = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).detach().cpu()
    if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:  # HWC -> CHW
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected an RGB image (PIL, HxWx3 or 3xHxW), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        t = (t.clamp(0, 1) * 255).round()
    return t.to(torch.uint8).contiguous()


def x100(cosine: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore scale for per-sample cosines: max(100 * cosine, 0)."""
    return torch.clamp(100 * cosine, min=0)


# --------------------------------------------------------------------------------------------------
# Image processors: the PIL ones, the same pixels everywhere (module docstring)
# --------------------------------------------------------------------------------------------------


def clip_image_processor(name: str):
    """CLIP's image processor for `name` (Hub id or folder): resize the short side, centre crop, normalise;
    PIL images -> `pixel_values` (N, 3, crop, crop)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(name)


def dino_image_processor(name: str):
    """DINO ViT's image processor for `name` (Hub id or folder): resize, normalise;
    PIL images -> `pixel_values` (N, 3, H, W)."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil.from_pretrained(name)


# --------------------------------------------------------------------------------------------------
# CLIP through torchmetrics
# --------------------------------------------------------------------------------------------------


def _as_tensor(features) -> torch.Tensor:
    """transformers < 5 returns the projected embedding as a tensor; 5.x returns an output object
    whose `pooler_output` holds it."""
    if isinstance(features, torch.Tensor):
        return features
    pooled = getattr(features, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"cannot find the projected CLIP embedding in a {type(features).__name__}")


class TensorFeatures(torch.nn.Module):
    """Wraps a transformers `CLIPModel` so that `get_text_features` / `get_image_features` return the
    projected embeddings as tensors, (N, projection_dim), which is what torchmetrics' CLIP score code
    expects; `.config` is the wrapped model's (torchmetrics reads the text length from it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def get_text_features(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def get_image_features(self, pixel_values, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))


class CLIPScorer:
    """One CLIP model, loaded once, scoring image-text and image-image pairs in batches.

    name:       Hub id or local folder of a transformers `CLIPModel` (+ its processor files)
    device:     where the model runs (default: CUDA when available)
    batch_size: pairs per forward pass

    `self.metric` is a torchmetrics `CLIPScore` built on the same model (through its callable
    `model_name_or_path` hook), for torchmetrics' own aggregate: `update(...)` then `compute()`
    gives max(100 * mean cosine, 0).
    """

    def __init__(self, name: str = DEFAULT_CLIP, *, device: str | torch.device | None = None, batch_size: int = 32):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

        self.name = str(name)
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size
        with loading("evaluation CLIP (a transformers CLIPModel with its processor)", self.name):
            model = CLIPModel.from_pretrained(self.name).eval()
            processor = CLIPProcessor(image_processor=clip_image_processor(self.name),
                                      tokenizer=AutoTokenizer.from_pretrained(self.name))
        self.model = TensorFeatures(model).to(self.device).eval()
        self.processor = processor
        self.metric = CLIPScore(model_name_or_path=lambda: (self.model, self.processor))
        self._update = clip_score_update()

    def __repr__(self) -> str:
        return f"CLIPScorer({self.name!r}, device={self.device})"

    def _images(self, images: Sequence[ImageLike]) -> list[torch.Tensor]:
        return [to_chw_uint8(im).to(self.device) for im in images]

    @torch.inference_mode()
    def _pairs(self, source: list, target: list) -> torch.Tensor:
        if len(source) != len(target):
            raise ValueError(f"got {len(source)} images but {len(target)} prompts/references: they must pair up")
        if not source:
            return torch.zeros(0)
        out = []
        for i in range(0, len(source), self.batch_size):
            s, t = source[i:i + self.batch_size], target[i:i + self.batch_size]
            s = self._images(s)
            t = list(t) if isinstance(t[0], str) else self._images(t)
            score, _ = self._update(s, t, self.model, self.processor)  # (n,) = 100 * cosine
            out.append(score.float().cpu() / 100)
        return torch.cat(out)

    def text_image(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-T: cosine between each image and its prompt, (N,) float32 on the CPU."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list with one prompt per image, not a single string")
        return self._pairs(list(images), list(prompts))

    def image_image(self, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> torch.Tensor:
        """CLIP-I: cosine between each image and its reference image, (N,) float32 on the CPU."""
        return self._pairs(list(images), list(references))

    @torch.inference_mode()
    def embed(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Unit-length projected image embeddings, (N, projection_dim) float32 on the CPU: what torchmetrics' CLIP
        score code computes for each image (the processor on the uint8 tensors, get_image_features, L2 norm), so
        the cosine of two rows is image_image's score, and an image scored against many is embedded once."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [to_chw_uint8(im) for im in images[i:i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(torch.nn.functional.normalize(self.model.get_image_features(pixels).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)


# --------------------------------------------------------------------------------------------------
# DINO
# --------------------------------------------------------------------------------------------------


class DINOScorer:
    """A DINO ViT (transformers `ViTModel`), loaded once; similarity = cosine of the CLS embeddings
    (`last_hidden_state[:, 0]`, after the final layer norm), as in DreamBooth's DINO metric."""

    def __init__(self, name: str = DEFAULT_DINO, *, device: str | torch.device | None = None, batch_size: int = 32):
        from transformers import ViTModel

        self.name = str(name)
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size
        with loading("DINO model (a transformers ViTModel with its image processor)", self.name):
            self.model = ViTModel.from_pretrained(self.name, add_pooling_layer=False).to(self.device).eval()
            self.processor = dino_image_processor(self.name)

    def __repr__(self) -> str:
        return f"DINOScorer({self.name!r}, device={self.device})"

    @torch.inference_mode()
    def embed(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Unit-length CLS embeddings, (N, hidden) float32 on the CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(to_chw_uint8(im).permute(1, 2, 0).numpy()) for im in images[i:i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            cls = self.model(pixel_values=pixels).last_hidden_state[:, 0].float()
            out.append(torch.nn.functional.normalize(cls, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def image_image(self, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> torch.Tensor:
        """Cosine between each image's and its reference's CLS embedding, (N,)."""
        images, references = list(images), list(references)
        if len(images) != len(references):
            raise ValueError(f"got {len(images)} images but {len(references)} references: they must pair up")
        return (self.embed(images) * self.embed(references)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Loaded once, reused
# --------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, object] = {}


def get_clip(clip: "str | CLIPScorer" = DEFAULT_CLIP, *, device=None) -> CLIPScorer:
    """A `CLIPScorer` for `clip` (returned as is if it already is one), loaded once per (id, device)."""
    if isinstance(clip, CLIPScorer):
        return clip
    key = ("clip", str(clip), str(torch.device(device) if device is not None else default_device()))
    if key not in _CACHE:
        _CACHE[key] = CLIPScorer(str(clip), device=device)
    return _CACHE[key]


def get_dino(dino: "str | DINOScorer" = DEFAULT_DINO, *, device=None) -> DINOScorer:
    """A `DINOScorer` for `dino` (returned as is if it already is one), loaded once per (id, device)."""
    if isinstance(dino, DINOScorer):
        return dino
    key = ("dino", str(dino), str(torch.device(device) if device is not None else default_device()))
    if key not in _CACHE:
        _CACHE[key] = DINOScorer(str(dino), device=device)
    return _CACHE[key]


def get_segmenter(segmenter=DEFAULT_SEGMENTER, *, device=None):
    """A helpers.data.masks.Segmenter for `segmenter` (returned as is if it already is one), loaded once per (id,
    device): the grid segments every output with it."""
    if not isinstance(segmenter, (str, Path)):
        return segmenter
    key = ("segmenter", str(segmenter), str(torch.device(device) if device is not None else default_device()))
    if key not in _CACHE:
        _CACHE[key] = load_segmenter(str(segmenter), device)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget the cached models (frees their GPU memory)."""
    _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The public functions (docs/architecture.md, "Entry points")
# --------------------------------------------------------------------------------------------------


def clip_t(images: Sequence[ImageLike], prompts: Sequence[str], clip: "str | CLIPScorer" = DEFAULT_CLIP) -> torch.Tensor:
    """CLIP-T per sample: cosine in [-1, 1] between images[i] and prompts[i], shape (N,).

    clip: Hub id or local folder of a transformers CLIPModel, or a loaded `CLIPScorer`.
    torchmetrics' CLIPScore scale for the same pairs: `x100(clip_t(...))`.
    """
    return get_clip(clip).text_image(images, prompts)


def clip_i(images: Sequence[ImageLike], references: Sequence[ImageLike], clip: "str | CLIPScorer" = DEFAULT_CLIP) -> torch.Tensor:
    """CLIP-I per sample: cosine in [-1, 1] between images[i] and references[i], shape (N,)."""
    return get_clip(clip).image_image(images, references)


def dino(images: Sequence[ImageLike], references: Sequence[ImageLike], dino: "str | DINOScorer" = DEFAULT_DINO) -> torch.Tensor:
    """DINO similarity per sample: cosine of DINO ViT CLS embeddings of images[i] and references[i], (N,)."""
    return get_dino(dino).image_image(images, references)


# --------------------------------------------------------------------------------------------------
# Subject-only scores (module docstring): the character alone, and the background alone
# --------------------------------------------------------------------------------------------------

SUBJECT_FILL = (255, 255, 255)  # what replaces the pixels a score must not see (module docstring: why white)


def subject_words(prompt: str) -> str:
    """The segmenter's prompt for an output: the words of its prompt naming the subject (the one rule,
    helpers.data.subjects), MASK_SUBJECT_DEFAULT when the prompt names none."""
    return subject_of(prompt, default=MASK_SUBJECT_DEFAULT)


def output_masks(images: Sequence[Image.Image], prompts: Sequence[str], *, segmenter=DEFAULT_SEGMENTER,
                 threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8) -> np.ndarray:
    """bool [N, H, W]: each output's character, segmented (helpers.data.masks.segment) with its prompt's subject
    words (subject_words). segmenter: a Hub id or folder (loaded once, get_segmenter) or a loaded Segmenter."""
    return segment([_rgb(im) for im in images], [subject_words(p) for p in prompts], segmenter=get_segmenter(segmenter),
                   threshold=threshold, batch_size=batch_size)


def _rgb(image: ImageLike) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(
        to_chw_uint8(image).permute(1, 2, 0).numpy())


def subject_scores(images: Sequence[ImageLike], masks, references: Sequence[ImageLike], reference_masks, *,
                   clip: "str | CLIPScorer" = DEFAULT_CLIP, dino: "str | DINOScorer" = DEFAULT_DINO,
                   fill=SUBJECT_FILL) -> dict[str, torch.Tensor]:
    """The subject-only scores of N (image, reference) pairs (module docstring): {"clip_i_subject",
    "dino_subject", "clip_i_background"}, each a float32 (N,) tensor of plain cosines, NaN where there is
    nothing to compare: the subject scores where either mask is empty, the background score where either is full.

    masks: bool [N, H, W] (or a list of [H, W]), each image's character at its size (output_masks);
    reference_masks: the same for the references, at theirs (helpers.data.masks.load_masks(prep).image("test", id)).
    """
    masks = [np.asarray(m, dtype=bool) for m in masks]
    reference_masks = [np.asarray(m, dtype=bool) for m in reference_masks]
    if not len(images) == len(masks) == len(references) == len(reference_masks):
        raise ValueError(f"subject_scores: {len(images)} images, {len(masks)} masks, {len(references)} references "
                         f"and {len(reference_masks)} reference masks: give one of each per pair")
    # each distinct (reference, mask) is embedded once: a grid's job scores one reference against many outputs
    keys = [(id(r), m.shape, np.packbits(m).tobytes()) for r, m in zip(references, reference_masks)]
    slot, unique = {}, []  # key -> its place among the distinct references; their first index in the pairs
    for k, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(unique)
            unique.append(k)
    row = torch.tensor([slot[key] for key in keys], dtype=torch.long)
    images, references = [_rgb(im) for im in images], [_rgb(references[k]) for k in unique]
    ref_masks = [reference_masks[k] for k in unique]
    subject = torch.tensor([bool(m.any() and r.any()) for m, r in zip(masks, reference_masks)])
    background = torch.tensor([bool((~m).any() and (~r).any()) for m, r in zip(masks, reference_masks)])
    clip_s, dino_s = get_clip(clip), get_dino(dino)

    def cosine(embed, keep, images_, references_):  # (N,): each image's embedding against its reference's
        e, r = embed(images_), embed(references_)
        return torch.where(keep, (e * r[row]).sum(-1), torch.tensor(float("nan"))) if len(e) else torch.zeros(0)

    on = [fill_background(im, m, fill) for im, m in zip(images, masks)]
    ref_on = [fill_background(im, m, fill) for im, m in zip(references, ref_masks)]
    off = [fill_background(im, ~m, fill) for im, m in zip(images, masks)]
    ref_off = [fill_background(im, ~m, fill) for im, m in zip(references, ref_masks)]
    return {"clip_i_subject": cosine(clip_s.embed, subject, on, ref_on),
            "dino_subject": cosine(dino_s.embed, subject, on, ref_on),
            "clip_i_background": cosine(clip_s.embed, background, off, ref_off)}
