"""The headline of notebook 05: the text-aware model against every baseline, as tables and sentences computed
from the rows (helpers.evaluate.stats does the statistics). Each comparison uses the references complete for both
of its models (stats.complete_references), so a grid stopped part way gives a smaller headline, still paired.

    paired_table(rows)                    the fine-tuned text-aware model minus each baseline, per IP scale
    headline_table(rows)                  its CLIP-T gain at matched CLIP-I over each baseline, overall and per
                                          edit category, with the interval and the half width it came out at
    headline(rows)                        the same in sentences, saying plainly when a comparison is impossible
    twin_pairs(rows)                      (masked run, its unmasked twin) for each masked run in the rows

Masked runs (notebook 03's MASK: the reference's background filled, the loss weighted by the mask, or both) are
compared with their unmasked twin, the same recipe without the mask, whenever both are in the rows: the three
functions above add "masked - twin" to their comparisons, with the same statistics (paired differences per IP
scale, the gain at matched CLIP-I, and in sentences the subject-only scores' paired differences), and leave masked
runs out of the text-aware model's default baselines. Which run is whose twin: the registry's pairing
(helpers.sample.registry.masked_twins, where the registry has one), else the name,
"<twin>-mask-<reference|loss|both>" (twin_of), which also pairs an extra model named that way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..sample import registry
from ..sample.registry import label, model_order
from .stats import (CATEGORIES, EDIT, OWN, SCORES, SUBJECT_SCORES, MatchedGain, as_frame, complete_references,
                    matched_gain, metric_label, paired_difference)

MASKED_NAME = re.compile(r"^(?P<twin>.+)-mask-(?P<mask>reference|loss|both)$")  # a masked run's registry name


def twin_of(model: str) -> str | None:
    """The unmasked twin of a masked run: the registry's (helpers.sample.registry.masked_twins(), where the registry
    has it), else from its name ("finetuned-text-aware-mask-loss" -> "finetuned-text-aware"); None for a model
    trained without a mask."""
    pairs = registry.masked_twins() if hasattr(registry, "masked_twins") else {}
    if model in pairs:
        return pairs[model]
    found = MASKED_NAME.match(str(model))
    return found["twin"] if found else None


def twin_pairs(rows) -> list[tuple[str, str]]:
    """(masked run, its unmasked twin) for every masked run in the rows whose twin is there too (model_order)."""
    present = model_order(as_frame(rows)["model"])
    return [(m, twin_of(m)) for m in present if twin_of(m) in present]


def _pairs(frame, model: str, baselines) -> list[tuple[str, str]]:
    """(a, b) comparisons of a - b: `model` against each baseline (when `model` is there), then each masked run
    against its twin."""
    pairs = [(model, b) for b in comparisons(frame, model, baselines)] if model in set(frame["model"]) else []
    return pairs + [p for p in twin_pairs(frame) if p not in pairs and p[::-1] not in pairs]


def _scores(frame) -> list[str]:
    return [m for m in SCORES if m in frame]


def paired_table(rows, *, model: str = "finetuned-text-aware", baselines: Sequence[str] | None = None,
                 prompt_kind: str | None = EDIT):
    """`model` minus each baseline (default: every other model but masked runs), then each masked run minus its
    twin (twin_pairs), image by image, per IP scale, over the references complete for both
    (complete_references: all of them unless the grid stopped part way): each score's mean difference with its
    95% paired interval, as 'mean [low, high]' strings (DataFrame; empty when there is nothing to compare)."""
    import pandas as pd

    frame = as_frame(rows)
    out = []
    for a, base in _pairs(frame, model, baselines):
        refs = complete_references(frame, (a, base))
        pair = frame[frame["reference"].isin(refs)]
        for scale in sorted(pair.loc[pair["model"] == a, "scale"].unique()):
            line = {"comparison": f"{label(a)} - {label(base)}", "IP scale": float(scale), "references": len(refs)}
            for m in _scores(frame):
                mean, lo, hi = paired_difference(pair, a, base, m, scale=scale, prompt_kind=prompt_kind)
                line[f"{metric_label(m)} difference"] = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            out.append(line)
    return pd.DataFrame(out)

def describe_gain(g: MatchedGain, clip_model: str = "") -> str:
    """One sentence for a MatchedGain, numbers included."""
    kind = {EDIT: "edit prompts", OWN: "the references' own captions", None: "all prompts"}[g.prompt_kind]
    if g.edit:
        kind = f"{g.edit} edits"
    sign = "higher" if g.gain >= 0 else "lower"
    if math.isnan(g.low):
        ci, verdict = "no interval: too few references, or the curves stop overlapping when one is left out", ""
    else:
        ci = f"95% paired interval {g.low:+.3f} to {g.high:+.3f}"
        verdict = (" - larger than the resampling noise" if g.low > 0 or g.high < 0 else
                   " - within the resampling noise (the interval includes 0)")
    return (f"On {kind}, at matched {metric_label(g.y)} ({g.y_range[0]:.3f} to {g.y_range[1]:.3f}, where both curves "
            f"overlap), {label(g.model)} has a {metric_label(g.x)} {abs(g.gain):.3f} {sign} than {label(g.baseline)} "
            f"({ci}, over {g.n_references} references; plain cosine"
            f"{', CLIP ' + clip_model if clip_model else ''}){verdict}.")

def _why_no_overlap(frame, a: str, b: str, y: str) -> str:
    """Why matched_gain found nothing: no reference complete for both yet, too few scales, or the two curves'
    y ranges (given) do not meet."""
    refs = complete_references(frame, (a, b))
    if not refs:
        return "no reference has all of both models' images yet (the grid stopped part way: run it again)"
    frame = frame[frame["reference"].isin(refs)]
    means = {m: frame[frame["model"] == m].groupby("scale")[y].mean() for m in (a, b)}
    if any(len(v) < 2 for v in means.values()):
        return "a curve needs at least two IP scales"
    ranges = ", ".join(f"{label(m)} {v.min():.3f} to {v.max():.3f}" for m, v in means.items())
    return f"their {metric_label(y)} ranges do not overlap ({ranges})"

# whom the text-aware model is compared with first: the nearest comparisons lead the headline
HEADLINE_BASELINES = ("finetuned-vanilla", "finetuned-text-aware-no-block", "pretrained-conceptrol", "pretrained-instantstyle",
                      "pretrained")

def comparisons(rows, model: str = "finetuned-text-aware", baselines: Sequence[str] | None = None) -> list[str]:
    """The baselines `model` is compared with: the given ones, else every other model in the rows but masked
    runs, which are compared with their twins (HEADLINE_BASELINES first, in that order, then the rest in
    model_order)."""
    present = [m for m in model_order(as_frame(rows)["model"]) if twin_of(m) is None]
    if baselines is None:
        baselines = [b for b in HEADLINE_BASELINES if b in present] + [b for b in present if b not in HEADLINE_BASELINES]
    return [b for b in baselines if b != model]

def headline_table(rows, *, model: str = "finetuned-text-aware", baselines: Sequence[str] | None = None,
                   y: str = "clip_i", categories: Sequence[str] = CATEGORIES):
    """`model`'s CLIP-T gain at matched `y` over each baseline (default: every other model in the rows), on
    all edit prompts and per edit category: a DataFrame with the gain, its 95% paired interval, the half
    width (the smallest difference this run resolves), the references, the matched range and the scores'
    backbones (empty when `model` is not in the rows); then each masked run against its twin, the same way;
    and the MatchedGain objects behind it, {(baseline, edit or None): MatchedGain, or None where the curves do not
    meet (the table says why)}, a masked run's keyed ((masked, twin), edit or None). Returns (table, gains)."""
    import pandas as pd

    frame = as_frame(rows)
    clip = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else "?"
    out, gains = [], {}
    for a, base in _pairs(frame, model, baselines):
        for edit in (None, *categories):
            if edit is not None and ("edit" not in frame or not (frame["edit"] == edit).any()):
                continue
            g = matched_gain(frame, a, base, y=y, edit=edit)
            gains[(base if a == model else (a, base), edit)] = g
            matched = (f"{g.y_range[0]:.3f}-{g.y_range[1]:.3f}" if g is not None
                       else _why_no_overlap(as_frame(frame, prompt_kind=EDIT, edit=edit), a, base, y))
            out.append({"comparison": f"{label(a)} - {label(base)}", "edit prompts": edit or "all",
                        f"CLIP-T gain at matched {metric_label(y)}": None if g is None else round(g.gain, 4),
                        "95% low": None if g is None else round(g.low, 4),
                        "95% high": None if g is None else round(g.high, 4),
                        "± resolvable": None if g is None else round(g.half_width, 4),
                        "references": None if g is None else g.n_references,
                        f"matched {metric_label(y)}": matched,
                        "scores": f"plain cosine, CLIP {clip}"})
    return pd.DataFrame(out), gains

def headline(rows, *, model: str = "finetuned-text-aware", baselines: Sequence[str] | None = None,
             prompt_kind: str | None = EDIT, random_weights: bool = False, seed: int = 0) -> str:
    """The result in sentences, computed from the rows: `model`'s CLIP-T gain at matched CLIP-I over each
    baseline (default: every other model in the rows but masked runs), and at matched DINO and subject CLIP-I
    (when the rows have it) over the first; then each masked run against its twin (_masked_sentences). Says
    plainly when a model is missing or the curves do not overlap, and how many images have no subject score.
    random_weights=True prefixes a warning that the numbers are meaningless."""
    frame = as_frame(rows)
    clip_model = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else ""
    present = set(frame["model"])
    lines = []
    if random_weights:
        lines.append("RANDOM WEIGHTS (tiny profile): the numbers below are meaningless; they only show that the code runs.")
    kept = as_frame(frame, prompt_kind=prompt_kind)
    if model not in present:
        others = model_order(present)
        lines.append(f"{label(model)} was not evaluated (no adapter), so there is no headline comparison; "
                     f"evaluated: {', '.join(map(label, others))}.")
        if len(others) >= 2:  # still compare what there is: the last against the first
            g = matched_gain(frame, others[-1], others[0], prompt_kind=prompt_kind, seed=seed)
            if g is not None:
                lines.append(describe_gain(g, clip_model))
        return " ".join(lines + _masked_sentences(frame, kept, clip_model, prompt_kind, seed))
    lines += [f"{label(b)} was not evaluated (no adapter), so no comparison with it." for b in (baselines or ())
              if b != model and b not in present]
    first = [y for y in ("clip_i", "dino", "clip_i_subject") if y in frame]
    for i, base in enumerate(b for b in comparisons(frame, model, baselines) if b in present):
        for y in (first if i == 0 else ("clip_i",)):
            lines.append(_gain_sentence(frame, kept, model, base, y, clip_model, prompt_kind, seed))
    return " ".join(lines + _masked_sentences(frame, kept, clip_model, prompt_kind, seed))


def _gain_sentence(frame, kept, a: str, b: str, y: str, clip_model: str, prompt_kind, seed: int) -> str:
    g = matched_gain(frame, a, b, y=y, prompt_kind=prompt_kind, seed=seed)
    if g is None:
        return f"{label(a)} and {label(b)} cannot be compared at matched {metric_label(y)}: {_why_no_overlap(kept, a, b, y)}."
    return describe_gain(g, clip_model)


def _masked_sentences(frame, kept, clip_model: str, prompt_kind, seed: int) -> list[str]:
    """Each masked run against its twin: the CLIP-T gain at matched CLIP-I (and subject CLIP-I), and the paired
    differences of the subject-only scores over all IP scales; then how many images have no subject score."""
    lines = []
    subject = [m for m in SUBJECT_SCORES if m in frame]
    for a, b in twin_pairs(frame):
        lines.append(f"Masked training: {label(a)} against its unmasked twin {label(b)}.")
        lines += [_gain_sentence(frame, kept, a, b, y, clip_model, prompt_kind, seed)
                  for y in ("clip_i", "clip_i_subject") if y in frame]
        refs = complete_references(kept, (a, b))
        if subject and refs:
            pair = kept[kept["reference"].isin(refs)]
            said = []
            for m in subject:
                mean, lo, hi = paired_difference(pair, a, b, m, prompt_kind=None)
                said.append(f"{metric_label(m)} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            lines.append(f"Image against image, all IP scales, over {len(refs)} references, {label(a)} minus "
                         f"{label(b)}: {'; '.join(said)} (mean [95% paired interval]; a kept character keeps "
                         "CLIP-I subject, a background left to the prompt lowers CLIP-I background).")
    if "clip_i_subject" in kept:
        n = int(kept["clip_i_subject"].isna().sum())
        if n:
            lines.append(f"{n} of {len(kept)} images have no subject score (their mask or their reference's is "
                         "empty): left out of the subject means.")
    return lines
