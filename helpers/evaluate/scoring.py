"""Score a job's images: one results.csv row per image (helpers.evaluate.grid runs the jobs, this scores them).

    ref_masks = make_reference_masks(references, masks, segmenter=seg, threshold=t)  # {id: bool [H, W]}
    rows = score_samples(samples, references, prompts, clip=clip, dino=dino, segmenter=seg, threshold=t,
                         reference_masks=ref_masks, files=files)   # one dict per sample (CSV_COLUMNS)

Each image is scored as it is in memory (helpers.evaluate.metrics: CLIP-T, CLIP-I, DINO, and the same on the
character alone and on the background alone). Subject-only scores: each output is segmented in memory, by the
segmenter that made the references' masks (notebook 01's masks.safetensors, `masks=`), loaded once per run like
the CLIP and DINO scorers, with its prompt's subject words; its character is then scored against the reference's
(helpers.evaluate.metrics.subject_scores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..data.masks import DEFAULT_THRESHOLD, mask_prompt, segment
from ..profile import CLIPSEG, DINO, EVAL_CLIP
from ..sample.references import Reference
from .metrics import get_clip, get_dino, get_segmenter, output_masks, subject_scores, x100
from .protocol import PromptSpec
from .results import IDENTITY
from .stats import EDIT

# Outputs are segmented one at a time: CLIPSeg's probabilities move by about 1e-5 with the batch around an image
# (measured on the tiny profile, CPU), which can flip a pixel at the threshold, so a job completed in part (a
# rerun) would mask an image differently from an uninterrupted run. The cost is small: counted (torch's
# FlopCounterMode, real shapes), CLIPSeg takes 0.084 TFLOP per image against about 51 to generate it; on this CPU
# at real shapes one image per call took 1.5 s against 1.4 s in batches of 4. Not measured on a GPU.
SEGMENT_BATCH = 1


def score_samples(samples, references: Sequence[Reference], prompts: Sequence[PromptSpec], *,
                  clip=EVAL_CLIP, dino=DINO, files=None, segmenter=CLIPSEG, threshold: float = DEFAULT_THRESHOLD,
                  reference_masks: Mapping | None = None) -> list[dict]:
    """One row per sample (CSV_COLUMNS): its settings, prompt kind, CLIP-T / CLIP-I / DINO scores, and the
    subject-only scores (helpers.evaluate.metrics.subject_scores; NaN where a mask is empty) with the share of the
    output on its character (subject_coverage).

    samples: objects with image, model, reference, prompt, scale, seed (steps, guidance, adapter_sha256
             optional), e.g. helpers.sample.generate.Sample; their images are scored as they are (in memory)
    clip, dino, segmenter: ids/folders or loaded helpers.evaluate.metrics scorers / a helpers.data.masks.Segmenter
             (loaded once and reused); threshold: the segmenter's (profile.mask_threshold)
    reference_masks: {reference id: bool [H, W]} (make_reference_masks); None: made here with `segmenter`
    files: optional file name per sample (where the image was saved)
    """
    samples = list(samples)
    by_id = {r.id: r for r in references}
    kinds = {(p.reference, p.prompt): p for p in prompts}
    missing = sorted({s.reference for s in samples} - set(by_id))
    if missing:
        raise KeyError(f"samples refer to references that were not given: {missing}")
    clip_s, dino_s, seg = get_clip(clip), get_dino(dino), get_segmenter(segmenter)
    if reference_masks is None:
        reference_masks = make_reference_masks([by_id[r] for r in dict.fromkeys(s.reference for s in samples)],
                                               segmenter=seg, threshold=threshold)
    images = [s.image for s in samples]
    refs = [by_id[s.reference].image for s in samples]
    t = clip_s.text_image(images, [s.prompt for s in samples]) if samples else []
    i = clip_s.image_image(images, refs) if samples else []
    d = dino_s.image_image(images, refs) if samples else []
    masks = output_masks(images, [s.prompt for s in samples], segmenter=seg, threshold=threshold,
                         batch_size=SEGMENT_BATCH)
    subject = subject_scores(images, masks, refs, [reference_masks[s.reference] for s in samples], clip=clip_s,
                             dino=dino_s)
    rows = []
    for k, s in enumerate(samples):
        spec = kinds.get((s.reference, s.prompt), PromptSpec(s.reference, s.prompt, EDIT, ""))
        rows.append({
            "model": s.model, IDENTITY: str(getattr(s, IDENTITY, "")), "scale": float(s.scale),
            "reference": str(s.reference), "prompt": s.prompt,
            "prompt_kind": spec.kind, "edit": spec.edit, "seed": int(s.seed),
            "steps": getattr(s, "steps", None), "guidance": getattr(s, "guidance", None),
            "clip_t": float(t[k]), "clip_t_x100": float(x100(t[k])),
            "clip_i": float(i[k]), "clip_i_x100": float(x100(i[k])), "dino": float(d[k]),
            **{name: float(v[k]) for name, v in subject.items()}, "subject_coverage": float(masks[k].mean()),
            "clip_model": clip_s.name, "dino_model": dino_s.name, "segmenter": seg.name,
            "mask_threshold": float(threshold),
            "file": files[k] if files is not None else "",
        })
    return rows


def make_reference_masks(references: Sequence[Reference], masks=None, *, segmenter=CLIPSEG,
                         threshold: float = DEFAULT_THRESHOLD) -> dict:
    """{reference id: bool [H, W]}, each reference's character at its image's size.

    masks: notebook 01's stored masks (helpers.data.mask_file.Masks, from prepare_masks / load_masks: the references
           are test rows, so masks.image("test", id)), whose segmenter and threshold must be `segmenter`'s and
           `threshold`, as the outputs are segmented with them; or {id: bool [H, W]}; or None: each reference
           segmented now with its caption's subject words (helpers.data.masks.mask_prompt), as prepare_masks does
           for a row without a mask of the user's."""
    if masks is None:
        seg = get_segmenter(segmenter)  # one at a time: references may differ in size
        return {r.id: segment([r.image], [mask_prompt(r.caption)], segmenter=seg, threshold=threshold)[0]
                for r in references}
    if isinstance(masks, Mapping):
        return {r.id: np.asarray(masks[r.id], dtype=bool) for r in references}
    name = segmenter if isinstance(segmenter, str) else getattr(segmenter, "name", str(segmenter))
    if str(name) != masks.segmenter or float(threshold) != masks.threshold:
        raise ValueError(
            f"{masks.path} was made by segmenter {masks.segmenter} at threshold {masks.threshold:g}, and this "
            f"evaluation segments its outputs with {name} at {float(threshold):g}: a reference's and an output's "
            "character must come from one segmenter. Run notebook 01's mask cell (prepare_masks(prep, profile)) "
            "with the profile this evaluation uses, or give it the masks' segmenter and threshold.")
    return {r.id: masks.image("test", r.id) for r in references}
