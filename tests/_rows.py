"""Test support: evaluation rows (one per image) for models whose scores are planted offsets plus noise."""
import numpy as np

from helpers.evaluate.stats import CATEGORIES, EDIT, OWN


def synthetic_rows(offsets, n_refs=12, scales=(0.3, 0.5, 0.7, 1.0), seed=0, noise=0.0, subject=False, seeds=(0,)):
    """Rows whose curves have the same shape, model m shifted by offsets[m] along CLIP-T (a number, or
    {edit category: number}); each reference has its own caption and one edit of a category in turn.
    noise: per-image noise on CLIP-T, independent between models. subject: add the subject-only scores (rising
    with the scale, the background's less). seeds: each image repeated, with the same scores, per seed."""
    rng = np.random.default_rng(seed)
    ref_t, ref_i = rng.normal(0, 0.01, n_refs), rng.normal(0, 0.01, n_refs)
    rows = []
    for model, off in offsets.items():
        for s in scales:
            for r in range(n_refs):
                cat = CATEGORIES[r % 4]
                for kind, edit in ((OWN, ""), (EDIT, cat)):
                    shift = off.get(edit, 0.0) if isinstance(off, dict) else off
                    row = {"model": model, "scale": s, "reference": f"ref{r}", "prompt": f"{kind} {edit}",
                           "prompt_kind": kind, "edit": edit, "seed": 0,
                           "clip_t": 0.32 - 0.08 * s + shift + ref_t[r] + rng.normal(0, noise),
                           "clip_i": 0.6 + 0.3 * s + ref_i[r], "dino": 0.4 + 0.4 * s + ref_i[r],
                           "clip_model": "tiny-clip", "dino_model": "tiny-dino"}
                    if subject:
                        row.update(clip_i_subject=0.5 + 0.35 * s + ref_i[r], dino_subject=0.3 + 0.4 * s + ref_i[r],
                                   clip_i_background=0.7 + 0.1 * s - ref_i[r], segmenter="tiny-clipseg",
                                   mask_threshold=0.5)
                    rows += [dict(row, seed=k) for k in seeds]
    return rows
