"""The headline of notebook 05: the text-aware model against every baseline, as tables and sentences computed
from the rows (helpers.evaluate.stats does the statistics). Each comparison uses the references complete for both
of its models (stats.complete_references), so a grid stopped part way gives a smaller headline, still paired.

    paired_table(rows)                    the fine-tuned text-aware model minus each baseline, per IP scale
    headline_table(rows)                  its CLIP-T gain at matched CLIP-I over each baseline, overall and per
                                          edit category, with the interval and the half width it came out at
    headline(rows)                        the same in sentences, saying plainly when a comparison is impossible
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..sample.registry import label, model_order
from .stats import (CATEGORIES, EDIT, METRICS, OWN, MatchedGain, as_frame, complete_references, matched_gain,
                    metric_label, paired_difference)


def paired_table(rows, *, model: str = "finetuned-text-aware", baselines: Sequence[str] | None = None,
                 prompt_kind: str | None = EDIT):
    """`model` minus each baseline (default: every other model), image by image, per IP scale, over the
    references complete for both (complete_references: all of them unless the grid stopped part way): each
    metric's mean difference with its 95% paired interval, as 'mean [low, high]' strings (DataFrame; empty when
    `model` is not in the rows)."""
    import pandas as pd

    frame = as_frame(rows)
    out = []
    for base in comparisons(frame, model, baselines) if model in set(frame["model"]) else ():
        refs = complete_references(frame, (model, base))
        pair = frame[frame["reference"].isin(refs)]
        for scale in sorted(pair.loc[pair["model"] == model, "scale"].unique()):
            line = {"comparison": f"{label(model)} - {label(base)}", "IP scale": float(scale), "references": len(refs)}
            for m in METRICS:
                mean, lo, hi = paired_difference(pair, model, base, m, scale=scale, prompt_kind=prompt_kind)
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
    """The baselines `model` is compared with: the given ones, else every other model in the rows
    (HEADLINE_BASELINES first, in that order, then the rest in model_order)."""
    present = model_order(as_frame(rows)["model"])
    if baselines is None:
        baselines = [b for b in HEADLINE_BASELINES if b in present] + [b for b in present if b not in HEADLINE_BASELINES]
    return [b for b in baselines if b != model]

def headline_table(rows, *, model: str = "finetuned-text-aware", baselines: Sequence[str] | None = None,
                   y: str = "clip_i", categories: Sequence[str] = CATEGORIES):
    """`model`'s CLIP-T gain at matched `y` over each baseline (default: every other model in the rows), on
    all edit prompts and per edit category: a DataFrame with the gain, its 95% paired interval, the half
    width (the smallest difference this run resolves), the references, the matched range and the scores'
    backbones (empty when `model` is not in the rows); and the MatchedGain objects behind it, {(baseline,
    edit or None): MatchedGain, or None where the curves do not meet (the table says why)}. Returns (table, gains)."""
    import pandas as pd

    frame = as_frame(rows)
    clip = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else "?"
    out, gains = [], {}
    for base in comparisons(frame, model, baselines) if model in set(frame["model"]) else ():
        for edit in (None, *categories):
            if edit is not None and ("edit" not in frame or not (frame["edit"] == edit).any()):
                continue
            g = matched_gain(frame, model, base, y=y, edit=edit)
            gains[(base, edit)] = g
            matched = (f"{g.y_range[0]:.3f}-{g.y_range[1]:.3f}" if g is not None
                       else _why_no_overlap(as_frame(frame, prompt_kind=EDIT, edit=edit), model, base, y))
            out.append({"comparison": f"{label(model)} - {label(base)}", "edit prompts": edit or "all",
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
    baseline (default: every other model in the rows), and at matched DINO over the first. Says plainly
    when a model is missing or the curves do not overlap. random_weights=True prefixes a warning that the
    numbers are meaningless."""
    frame = as_frame(rows)
    clip_model = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else ""
    present = set(frame["model"])
    lines = []
    if random_weights:
        lines.append("RANDOM WEIGHTS (tiny profile): the numbers below are meaningless; they only show that the code runs.")
    if model not in present:
        others = model_order(present)
        lines.append(f"{label(model)} was not evaluated (no adapter), so there is no headline comparison; "
                     f"evaluated: {', '.join(map(label, others))}.")
        if len(others) >= 2:  # still compare what there is: the last against the first
            g = matched_gain(frame, others[-1], others[0], prompt_kind=prompt_kind, seed=seed)
            if g is not None:
                lines.append(describe_gain(g, clip_model))
        return " ".join(lines)
    lines += [f"{label(b)} was not evaluated (no adapter), so no comparison with it." for b in (baselines or ())
              if b != model and b not in present]
    kept = as_frame(frame, prompt_kind=prompt_kind)
    for i, base in enumerate(b for b in comparisons(frame, model, baselines) if b in present):
        for y in (("clip_i", "dino") if i == 0 and "dino" in frame else ("clip_i",)):
            g = matched_gain(frame, model, base, y=y, prompt_kind=prompt_kind, seed=seed)
            if g is None:
                lines.append(f"{label(model)} and {label(base)} cannot be compared at matched {metric_label(y)}: "
                             f"{_why_no_overlap(kept, model, base, y)}.")
            else:
                lines.append(describe_gain(g, clip_model))
    return " ".join(lines)
