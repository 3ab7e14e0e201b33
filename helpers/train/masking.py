"""Masked training: teach the adapter the character, not the picture (MASK in notebook 03, --mask).

    none       today's recipe, the default
    reference  the adapter encodes each reference with its background filled white
               (helpers.data.masks.fill_background with the reference's own mask): the authors' full-face recipe.
               Those pictures' image features are cached once beside the feature cache, like the mirror
               features (helpers.data.features.cache_image_variant), and replace image_embeds in training.
    loss       the denoising loss weighted by the TARGET's mask at latent size, m: w = m + b (1 - m),
               loss = sum w (eps - eps_hat)^2 / sum w per sample (helpers.train.loss.masked_mse), with
               b = profile.mask_background_weight; the same when a condition is dropped
    both       reference and loss

The masks are notebook 01's (helpers.data.masks: every row's, stored with the prepared data); a run whose data
folder has none, or stale ones, makes them first as 01's mask cell would (prepare_masks(prep, profile)), as a
missing feature cache is built. Masking composes with PAIRING: the loss always takes the target row's mask;
the reference is encoded with its own mask (neighbour: the other drawing's; mirror: the masked picture,
mirrored). A masked run goes to a folder of its own (helpers.train.pairing.run_name: runs/text_aware-mask_loss)
and records its mask in RESUME_SETTINGS, so a changed mask never resumes it.

    masking = prepare_masking("both", prep, profile, cache_path, pairs)   # once per run (helpers.train.run)
    feats = masking.apply(feats, pairs)     # image_embeds: the masked references' features
    masking.loss_masks[rows]                # (B, h, w): the targets' masks at latent size, for the loss
    print(cost_line("both", "text_aware", steps, n))   # what it costs on a T4, before it starts
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..data.features import cache_image_variant
from ..data.mask_file import Masks
from ..data.masks import MasksError, fill_background, load_masks, prepare_masks

MASKS = ("none", "reference", "loss", "both")
FILL = (255, 255, 255)  # the reference's background: white, as IP-Adapter's full-face model was trained
MASKED_VERSION = "1"  # bump when the masked references' features would come out different


def masks_reference(mask: str) -> bool:
    """Whether `mask` fills the reference's background (reference, both)."""
    return mask in ("reference", "both")


def masks_loss(mask: str) -> bool:
    """Whether `mask` weights the loss by the target's mask (loss, both)."""
    return mask in ("loss", "both")


def check_mask(mask: str) -> str:
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}: choose one of {', '.join(MASKS)} (MASK in notebook 03, --mask)")
    return mask


@dataclass
class Masking:
    """What a masked run trains with (prepare_masking); rows in the feature cache's order."""

    mask: str
    masks: Masks  # helpers.data.masks: every row's mask, as notebook 01 stored it
    background_weight: float | None  # b of the loss weights (loss, both); None otherwise
    loss_masks: torch.Tensor | None  # (N, h, w) float32: the share of each latent pixel on the character (loss, both)
    reference_embeds: torch.Tensor | None  # (N, 257, 1280) fp16: the masked references' features (reference, both)
    mirror_embeds: torch.Tensor | None = None  # (N, 257, 1280) fp16: of the masked pictures mirrored (mirror pairing)

    def apply(self, feats: dict[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
        """The feature cache as training reads it: image_embeds replaced by the masked references' (reference,
        both), and the mirror pairing's mirror features by the masked mirrored pictures'. The latents, text and
        null features stay the cache's."""
        if self.reference_embeds is None:
            return feats
        if pairs is not None and pairs.pairing == "mirror":
            pairs.mirror_embeds = self.mirror_embeds
        return {**feats, "image_embeds": self.reference_embeds}

    def settings(self) -> dict:
        """What config.json records (RESUME_SETTINGS holds "masks" and "mask_background_weight")."""
        sources = {s: self.masks.sources["train"].count(s) for s in sorted(set(self.masks.sources["train"]))}
        return {"masks": self.masks.meta["fingerprint"][:16], "mask_background_weight": self.background_weight,
                "mask_fill": list(FILL) if self.reference_embeds is not None else None,
                "mask_segmenter": self.masks.segmenter, "mask_threshold": self.masks.threshold,
                "mask_sources": sources}


def training_masks(prep, profile, *, progress: bool = True, announce: bool = True) -> Masks:
    """Notebook 01's masks of `prep` (load_masks); when it stored none, or stale ones, they are made now as 01's
    mask cell makes them (prepare_masks(prep, profile): the profile's segmenter and threshold), and one line
    says so."""
    try:
        return load_masks(prep)
    except MasksError as e:
        if announce:
            why = str(e).split(". ")[0]
            print(f"{why}. Making every drawing's mask now, as notebook 01's mask cell does: {profile.segmenter} at "
                  f"threshold {profile.mask_threshold:g}.")
        return prepare_masks(prep, profile, progress=progress)


def latent_masks(masks: Masks, ids) -> torch.Tensor:
    """(N, h, w) float32: the training rows' masks at latent size (Masks.latent), in the order of `ids`."""
    return torch.stack([torch.from_numpy(masks.latent("train", i)) for i in ids])


def masked_reference_features(prep, cache_path, masks: Masks, profile, *, mirror: bool = False,
                              progress: bool = True) -> torch.Tensor:
    """(N, 257, 1280) fp16: the image features of every training drawing with its background filled (FILL) by
    its own mask, mirrored after filling if `mirror`; cached beside the feature cache
    (<stem>_masked.safetensors, <stem>_masked_mirror.safetensors), reused while the cache, the masks and
    MASKED_VERSION are unchanged."""
    from PIL import ImageOps
    from safetensors.torch import load_file

    ids = list(prep.train["id"])
    images = [masks.image("train", i) for i in ids]  # bool [R, R] each, in the cache's order

    def transform(i, image):
        filled = fill_background(image, images[i], FILL)
        return ImageOps.mirror(filled) if mirror else filled

    name = "masked_mirror" if mirror else "masked"
    path = cache_image_variant(prep.train, cache_path, name, transform, version=MASKED_VERSION,
                               extra_meta={"masks": masks.meta["fingerprint"], "fill": json.dumps(FILL)},
                               base_model=profile.base_model, ip_adapter=profile.ip_adapter,
                               image_encoder=profile.image_encoder, resolution=prep.info["resolution"],
                               batch_size=profile.feature_batch_size, progress=progress)
    return load_file(str(path))[f"{name}_image_embeds"]


def prepare_masking(mask: str, prep, profile, cache_path, feats: dict[str, torch.Tensor], pairs=None, *,
                    progress: bool = True, announce: bool = True) -> Masking | None:
    """What a run with `mask` trains with (None for "none"): the masks (training_masks), the targets' masks at
    latent size (loss, both) and the masked references' features (reference, both; with mirror pairing also
    those of the masked pictures mirrored). feats: the feature cache's tensors (its latents give the latent
    size), rows in prep.train's order. Raises ValueError for an unknown mask or a mask of another size."""
    if check_mask(mask) == "none":
        return None
    masks = training_masks(prep, profile, progress=progress, announce=announce)
    ids = list(prep.train["id"])
    loss_masks = b = reference = mirror = None
    if masks_loss(mask):
        b = float(profile.mask_background_weight)
        if not 0 < b <= 1:
            raise ValueError(f"profile.mask_background_weight = {b!r}: it must lie in (0, 1] (0 would leave the "
                             "background untrained)")
        loss_masks = latent_masks(masks, ids)
        if loss_masks.shape[1:] != feats["latent_mean"].shape[-2:]:
            raise ValueError(f"{masks.path}: masks of {tuple(loss_masks.shape[1:])} latent pixels for latents of "
                             f"{tuple(feats['latent_mean'].shape[-2:])}: run notebook 01's mask cell again")
    if masks_reference(mask):
        reference = masked_reference_features(prep, cache_path, masks, profile, progress=progress)
        if pairs is not None and pairs.pairing == "mirror":
            mirror = masked_reference_features(prep, cache_path, masks, profile, mirror=True, progress=progress)
    return Masking(mask, masks, b, loss_masks, reference, mirror)


def cost_line(mask: str, variant: str, steps: int, train_images: int, *, checkpointing: bool = False,
              gpus: int = 1, mirror: bool = False) -> str:
    """What a masked run costs on a T4, before it starts: its training steps projected as notebook 03's runs are
    (helpers.support.budget_counts.training_minutes: counted FLOPs of the full profile's step, at the expected
    efficiency), and for reference masking the one image-encoder pass over the training drawings (two with
    mirror pairing) that the masked references' features take."""
    from ..support.budget_counts import SAMPLING, TRAINING, minutes, t4_budget, training_minutes

    where = "a T4" if gpus == 1 else f"{gpus} T4s"
    train = training_minutes(variant, steps, checkpointing=checkpointing, gpus=gpus)
    parts = [f"{steps} training steps of {variant}, about {train:.1f} min, as its unmasked twin"]
    if masks_loss(mask):
        parts.append("the loss weights add no counted work")
    if masks_reference(mask):
        passes = 2 if mirror else 1
        per_image = t4_budget()["sampling"]["image_encoder_tflop_per_reference"] / 2  # the file counts two passes
        encode = minutes(passes * train_images * per_image, SAMPLING.expected)
        parts.append(f"the masked references' image features, once (then cached): {passes * train_images} pictures, "
                     f"about {encode:.1f} min")
    return (f"MASK = {mask!r}, an opt-in run, projected on {where} at the full profile's step size "
            f"({TRAINING.expected:.0%} of the peak for training, helpers.support.budget): " + "; ".join(parts) + ".")
