"""The evaluation protocol of notebook 05 (and `python -m helpers.evaluate`): consistency (CLIP-I, DINO)
against variation (CLIP-T), for the models of the bank (by default the headline comparison: `grid_models`).

    references  held-out test images (helpers.sample.references.pick_references: notebook 01's test split, one per
                group, seeded); `check_held_out` refuses any reference that is in, or a near-duplicate of,
                the training split
    prompts     each reference's own caption + EDIT_PROMPTS (setting, outfit, action, style), chosen by the
                reference's id alone, so that adding references keeps the prompts of those scored (`build_prompts`)
    grid        models x IP-Adapter scales x references x prompts x seeds, generated and scored per image
                by helpers.evaluate.grid.run_grid (one row per image in results.csv, appended job by job; a rerun
                skips the rows already there)
    size        the full profile's default grid is the headline comparison (GRID_MODELS) over the largest number
                of references, at least MIN_REFERENCES, whose grid fits profile.eval_minutes on a T4
                (`grid_references`: the counted cost of an image at GRID_EFFICIENCY of the T4's peak,
                helpers.support.budget); models or scales added on top lengthen the grid and keep its references

`protocol(profile, prep)` and `grid_settings(profile)` are the one definition of which references, prompts
and settings a run uses; the notebook and the command line both call them:

    python -m helpers.evaluate --profile full [--references N --scales 0.3,0.5 ...]   # resumes like 05

The statistics of the rows are in helpers.evaluate.stats (and, against every baseline, helpers.evaluate.headline),
the figures in helpers.evaluate.plots, the CSV format in helpers.evaluate.results. All scores are plain cosines
(helpers.evaluate.metrics); `*_x100` columns are torchmetrics' CLIPScore scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import ImageOps

from ..data.duplicates import MAX_HASH_DISTANCE, dhash
from ..data.subjects import Subject, find_subject
from ..sample.registry import MODEL_NAMES, model_order
from ..support.budget_counts import SAMPLING, seconds_per_image
from ..profile import EVAL_CLIP
from ..sample.references import Reference, column, pick_references
from .metrics import get_clip
from .stats import EDIT, OWN, bootstrap_ci

# The edit prompts: each asks for something a reference does not show. A generic "cartoon character",
# so the reference, not the words, supplies who it is.
EDIT_PROMPTS = {
    "setting": ["a cartoon character standing on a beach at sunset",
                "a cartoon character in a snowy forest at night"],
    "outfit": ["a cartoon character wearing a black tuxedo and a top hat",
               "a cartoon character wearing a white space suit"],
    "action": ["a cartoon character riding a bicycle",
               "a cartoon character playing an electric guitar"],
    "style": ["a watercolor painting of a cartoon character",
              "a pixel art picture of a cartoon character"],
}
REFERENCE_SEED = 0  # which held-out groups pick_references draws

# The default grid fits profile.eval_minutes at this fraction of the T4's fp16 peak, from the counted cost of an
# image (helpers.support.budget: counted FLOPs at the fraction published T4 sampling speeds imply, not a
# measurement; notebook 05 times its own GPU)
GRID_EFFICIENCY = SAMPLING.expected

# Notebook 05's default grid: the headline comparison, sized for one sitting. At the expected 12% of a T4's peak
# an image takes 6.5 s (helpers.support.budget), so every model of the registry at 4 IP scales over 10 references
# (840 images) would take 92 minutes. The headline is the fine-tuned text-aware model against its two closest
# baselines, trained on the same data with the same recipe: fine-tuned vanilla (no block), and the same weights
# with the block removed. These three at the 4 scales are 36 images a reference: 11 references fit 45 minutes.
# Models were cut, not scales (the gain at matched CLIP-I interpolates each model's curve over the scales) nor
# the sampler's 30 DDIM steps (the seed's; another sampler would need its own evidence and would change every
# picture already scored). The pretrained adapter, InstantStyle, Conceptrol and the neighbour-paired model are
# one setting away: Profile.eval_models (their names, or ALL_MODELS); a rerun keeps the rows already scored.
GRID_MODELS = ("finetuned-text-aware", "finetuned-vanilla", "finetuned-text-aware-no-block")
ALL_MODELS = "all"
# the fewest references a sized grid takes: fewer make the headline's interval meaningless, so more models or
# scales make the grid longer rather than its references fewer
MIN_REFERENCES = 10


class TrainingImageError(ValueError):
    """A reference image that belongs to (or duplicates an image of) the training split."""


def check_held_out(references: Sequence[Reference], train, *, max_distance: int | None = None) -> None:
    """Raise TrainingImageError if any reference is a training image.

    A reference counts as a training image when its `id` or its `group` appears in the training split, or
    when its perceptual hash, or its mirror's, is within `max_distance` bits of a training image's: the
    rule helpers.data.duplicates uses to keep near-duplicates (mirrored copies, re-encodings) on one side of the split
    (256-bit dHash, default max distance helpers.data.duplicates.MAX_HASH_DISTANCE).

    train: the training split (datasets.Dataset, or a list of dicts with image and, if known, id / group).
    """
    max_distance = MAX_HASH_DISTANCE if max_distance is None else max_distance
    refs = list(references)
    if not refs or not len(train):
        return
    train_ids = {str(i) for i in (column(train, "id") or [])}
    train_groups = {str(g) for g in (column(train, "group") or [])}
    images = column(train, "image")
    if images is None:
        raise KeyError("the training split has no 'image' column: cannot check the references against it")
    hashes = np.stack([dhash(im) for im in images])  # (n_train, 256) bool
    train_ref = column(train, "id", default=lambda i: f"train row {i}")
    problems = []
    for ref in refs:
        why = []
        if ref.id in train_ids:
            why.append("its id is in the training split")
        if ref.group and ref.group in train_groups:
            why.append(f"its group {ref.group!r} is in the training split")
        for label, im in (("", ref.image), ("mirrored ", ImageOps.mirror(ref.image))):
            distance = (hashes != dhash(im)).sum(axis=1)
            j = int(distance.argmin())
            if distance[j] <= max_distance:
                why.append(f"{label}it matches training image {train_ref[j]!r} (dHash distance {distance[j]} bits)")
                break
        if why:
            problems.append(f"reference {ref.id!r}: " + "; ".join(why))
    if problems:
        raise TrainingImageError(
            "these references are training images, so they cannot measure generalisation:\n  "
            + "\n  ".join(problems)
            + "\nUse the held-out test split from notebook 01 (helpers.data.prepare.load_prepared(...).test).")


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """One prompt for one reference: its own caption, or an edit of a given category."""

    reference: str
    prompt: str
    kind: str  # OWN or EDIT
    edit: str = ""  # edit category ("setting", "outfit", "action", "style"); "" for the own caption
    concept: str = ""  # the words naming the subject (Conceptrol's mask): concept_of(prompt)


def concept_of(prompt: str) -> Subject:
    """(concept, how it was found) of a prompt: helpers.data.subjects.find_subject, the one rule the panel
    and `generate` use too (the whole prompt when no words name a subject). `how` is shown in notebook 05's
    prompt table."""
    return find_subject(prompt)


def _flat_edits(edit_prompts) -> list[tuple[str, str]]:
    """(category, prompt) pairs, interleaved across categories so that a rotation visits all of them."""
    if isinstance(edit_prompts, Mapping):
        columns = [[(cat, p) for p in ([ps] if isinstance(ps, str) else ps)] for cat, ps in edit_prompts.items()]
        out = []
        for i in range(max((len(c) for c in columns), default=0)):
            out += [c[i] for c in columns if i < len(c)]
        return out
    return [(EDIT, p) for p in edit_prompts]


def build_prompts(references: Sequence[Reference], edit_prompts, edits_per_reference: int) -> list[PromptSpec]:
    """Each reference's own caption, plus `edits_per_reference` edit prompts from `edit_prompts`
    ({category: [prompts]} or a list) chosen by the reference's id alone (`edits_for`): adding references, or
    reordering them, never changes the prompts of a reference already scored."""
    edits = _flat_edits(edit_prompts)
    if edits_per_reference < 0 or edits_per_reference > len(edits):
        raise ValueError(f"edits_per_reference={edits_per_reference}: choose 0 to {len(edits)} (the number of edit prompts)")
    specs = []
    for ref in references:
        specs.append(PromptSpec(ref.id, ref.caption, OWN, concept=concept_of(ref.caption)[0]))
        for cat, prompt in edits_for(ref.id, [e for e in edits if e[1] != ref.caption], edits_per_reference):
            specs.append(PromptSpec(ref.id, prompt, EDIT, cat, concept_of(prompt)[0]))
    return specs


def edits_for(reference_id: str, edits: Sequence[tuple[str, str]], k: int) -> list[tuple[str, str]]:
    """k of `edits` ((category, prompt) pairs) for one reference, from its id alone: the edits ranked by a
    SHA-256 of the id and the prompt, the first of each category before any second, so that a reference's
    edits span k categories while there are that many. Across references the categories are spread by
    chance, not in turns (11 references x 2 edits over 4 categories: 5 or 6 each on average); a prompt added to
    the list moves only the references it ranks first for."""
    ranked = sorted(edits, key=lambda e: hashlib.sha256(f"{reference_id}\n{e[1]}".encode()).digest())
    firsts, categories = [], set()
    for cat, prompt in ranked:  # each category's best-ranked edit, in rank order
        if cat not in categories:
            firsts.append((cat, prompt))
            categories.add(cat)
    return (firsts + [e for e in ranked if e not in firsts])[:k]


def grid_size(n_prompts: int, n_models: int, n_scales: int, n_seeds: int) -> int:
    """Images in an evaluation grid: (reference, prompt) pairs x models x scales x seeds."""
    return n_prompts * n_models * n_scales * n_seeds


def references_for_budget(minutes: float, seconds_per_image: float, *, n_models: int, n_scales: int, n_seeds: int,
                          prompts_per_reference: int, available: int) -> int:
    """The most references (at most `available`) whose grid takes no more than `minutes` to generate at
    `seconds_per_image`: how notebook 05's default size is chosen."""
    per_reference = seconds_per_image * grid_size(prompts_per_reference, n_models, n_scales, n_seeds)
    return int(max(1, min(available, (60 * minutes) // per_reference)))


def grid_models(profile, available: Sequence[str] = MODEL_NAMES) -> list[str]:
    """The models of the evaluation grid, the headline's first: profile.eval_models when set (ALL_MODELS:
    every one of `available`), else GRID_MODELS, plus any model of `available` the registry does not name (an
    extra model the user added). `available`: what the bank has (bank.names), default every model of the
    registry. Default models the bank lacks (notebook 03 not run) are left out, and when it has none of them
    the grid takes every model it has; a model asked for by name that it lacks is a ValueError."""
    available = list(available)
    asked = tuple(profile.eval_models or ())
    if ALL_MODELS in asked:
        chosen = available
    elif asked:
        missing = [m for m in asked if m not in available]
        if missing:
            raise ValueError(f"eval_models {', '.join(missing)}: not in the bank, which has {', '.join(available)} "
                             "(train it in notebook 03, or load it as an extra model)")
        chosen = list(asked)
    else:
        chosen = [m for m in GRID_MODELS if m in available] or available
    chosen += [m for m in available if m not in MODEL_NAMES and m not in chosen]
    return [m for m in GRID_MODELS if m in chosen] + [m for m in model_order(chosen) if m not in GRID_MODELS]


def grid_references(profile, available: int, n_models: int | None = None) -> int:
    """How many held-out references the grid takes: profile.eval_num_references when set, else the most whose
    default grid fits profile.eval_minutes on a T4 at GRID_EFFICIENCY of its peak (the counted seconds per image,
    helpers.support.budget), and never fewer than MIN_REFERENCES; at most `available` (the test split's
    near-duplicate groups). The default grid: n_models (default: the headline comparison, GRID_MODELS) at the
    Profile's default scales, seeds and edits. Models, scales, seeds or edits added on top make the grid longer,
    never its references fewer: a grid grown in a later sitting keeps every reference already scored."""
    if profile.eval_num_references is not None:
        return max(1, min(profile.eval_num_references, available))
    default = {f.name: f.default for f in dataclasses.fields(profile)}
    fit = references_for_budget(profile.eval_minutes, seconds_per_image(GRID_EFFICIENCY, segmented=True),
                                n_models=len(GRID_MODELS) if n_models is None else n_models,
                                n_scales=len(default["eval_scales"]), n_seeds=len(default["eval_seeds"]),
                                prompts_per_reference=1 + default["eval_edits_per_reference"], available=available)
    return min(available, max(fit, MIN_REFERENCES))


def protocol(profile, prep, *, n_models: int | None = None,
             edit_prompts=None) -> tuple[list[Reference], list["PromptSpec"]]:
    """The references (grid_references of them: held-out groups, seeded, so that more references add to those
    of fewer; n_models: sized for, default the headline comparison's) and prompts (own caption + profile.eval_edits_per_reference edits each) of a run on
    notebook 01's split `prep`."""
    groups = len(set(prep.test["group"])) if len(prep.test) else 0
    references = pick_references(prep.test, grid_references(profile, max(1, groups), n_models), seed=REFERENCE_SEED)
    prompts = build_prompts(references, EDIT_PROMPTS if edit_prompts is None else edit_prompts,
                            profile.eval_edits_per_reference)
    return references, prompts


def grid_settings(profile) -> dict:
    """run_grid's settings from the profile: scales, seeds, scorers (the segmenter and its threshold too), batch
    size."""
    return {"scales": tuple(profile.eval_scales), "seeds": tuple(profile.eval_seeds), "clip": profile.eval_clip,
            "dino": profile.dino, "segmenter": profile.segmenter, "mask_threshold": profile.mask_threshold,
            "batch_size": profile.eval_batch_size}


# --------------------------------------------------------------------------------------------------
# What a copy of the reference would score
# --------------------------------------------------------------------------------------------------


def copy_baseline(references: Sequence[Reference], prompts: Sequence[PromptSpec], *,
                  clip=EVAL_CLIP) -> dict[str, tuple[float, float, float]]:
    """CLIP-T of the reference images themselves with each of their prompts, per prompt kind:
    {kind: (mean, low, high)} over references. It is what a model that copies the reference and ignores
    the prompt would score (its CLIP-I and DINO would be 1)."""
    by_id = {r.id: r for r in references}
    scores = get_clip(clip).text_image([by_id[p.reference].image for p in prompts], [p.prompt for p in prompts])
    out = {}
    for kind in (OWN, EDIT):
        keep = [k for k, p in enumerate(prompts) if p.kind == kind]
        if keep:
            out[kind] = bootstrap_ci(scores[keep].numpy(), [prompts[k].reference for k in keep])
    return out
