"""The statistics of the evaluation: intervals over references, the summary table, the headline.

Input: rows, one per generated image (helpers.evaluation.score_samples, or a CSV read back), with at least
model, scale, reference, prompt_kind and the metric columns (clip_t, clip_i, dino: plain cosines).

    bootstrap_ci(values, groups)     mean and 95% percentile bootstrap interval, resampling *references*
    summarize(rows)                  per model and scale: each metric's mean [interval] (pandas DataFrame)
    matched_gain(rows, a, b)         a's CLIP-T minus b's at matched CLIP-I, along each model's scale curve,
                                     with a paired bootstrap interval
    headline(rows)                   that result in sentences, computed from the rows, never typed by hand
    seed_comparison(rows)            the seed project's "CLIP-T 0.32" beside ours, with what is known of each

Images of one reference are not independent evidence, so every interval resamples references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .bank import model_order

OWN, EDIT = "own caption", "edit"  # prompt kinds: a reference's own caption, or an edit prompt
METRICS = ("clip_t", "clip_i", "dino")
SEED_PROJECT_CLIP_T = 0.32  # the seed project's reported "mean CLIP-T" (plain cosine; model and prompts unknown)


def bootstrap_ci(values, groups=None, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and a percentile bootstrap interval.

    groups: one label per value (the reference of each image). Values are first averaged per group and the
            groups are resampled with replacement, so images of the same reference never count as
            independent evidence. Without groups every value is its own group.
    Fewer than two groups: the interval is (nan, nan).
    """
    values = np.asarray(values, dtype=np.float64)
    if groups is not None:
        groups = np.asarray([str(g) for g in groups])
        if len(groups) != len(values):
            raise ValueError(f"{len(values)} values but {len(groups)} group labels")
        labels = list(dict.fromkeys(groups.tolist()))
        values = np.array([values[groups == g].mean() for g in labels])
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return mean, float(lo), float(hi)


def _frame(rows):
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("no rows to summarise")
    return frame


def summarize(rows, *, prompt_kind: str | None = None, columns: Sequence[str] = METRICS, n_boot: int = 2000,
              level: float = 0.95, seed: int = 0):
    """A table (pandas DataFrame), one line per model and scale: n references and images, and for each
    metric in `columns` its mean with the bootstrap interval over references (`<m>`, `<m>_lo`, `<m>_hi`), plus
    `clip_t_x100`: torchmetrics' CLIPScore of those images and prompts, max(100 x mean cosine, 0).

    prompt_kind: OWN or EDIT to keep only those prompts; None for all.
    """
    import pandas as pd

    frame = _frame(rows)
    if prompt_kind is not None:
        frame = frame[frame["prompt_kind"] == prompt_kind]
        if frame.empty:
            raise ValueError(f"no rows with prompt_kind {prompt_kind!r}")
    out = []
    for model in model_order(frame["model"]):
        for scale in sorted(frame.loc[frame["model"] == model, "scale"].unique()):
            cell = frame[(frame["model"] == model) & (frame["scale"] == scale)]
            line = {"model": model, "scale": float(scale), "n_references": cell["reference"].nunique(),
                    "n_images": len(cell)}
            for m in columns:
                line[m], line[f"{m}_lo"], line[f"{m}_hi"] = bootstrap_ci(
                    cell[m], cell["reference"], n_boot=n_boot, level=level, seed=seed)
            if "clip_t" in columns:
                line["clip_t_x100"] = max(100 * float(cell["clip_t"].mean()), 0.0)
            out.append(line)
    return pd.DataFrame(out)


def format_summary(summary, digits: int = 3):
    """The summary with each metric as 'mean [low, high]' strings, for display."""
    import pandas as pd

    shown = summary[["model", "scale", "n_references", "n_images"]].copy()
    for m in METRICS:
        if m in summary:
            shown[m] = [f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                        for v, lo, hi in zip(summary[m], summary[f"{m}_lo"], summary[f"{m}_hi"])]
    if "clip_t_x100" in summary:
        shown["CLIPScore (x100)"] = summary["clip_t_x100"].round(1)
    return pd.DataFrame(shown)


# --------------------------------------------------------------------------------------------------
# The headline: CLIP-T gain at matched CLIP-I
# --------------------------------------------------------------------------------------------------


@dataclass
class MatchedGain:
    """How much higher `model`'s x metric is than `baseline`'s at the same y metric, averaged over the
    y range where both curves exist (linear interpolation along each model's curve across scales)."""

    model: str
    baseline: str
    gain: float
    low: float  # bootstrap interval over references (nan if it could not be estimated)
    high: float
    y_range: tuple[float, float]
    n_references: int
    x: str = "clip_t"
    y: str = "clip_i"
    prompt_kind: str | None = EDIT


def _cell_means(frame, models, x, y):
    """Per model: scales, and (scales x references) arrays of per-reference means of x and y."""
    refs = sorted(set.intersection(*(set(frame.loc[frame["model"] == m, "reference"]) for m in models)))
    out = {}
    for m in models:
        part = frame[(frame["model"] == m) & frame["reference"].isin(refs)]
        scales = sorted(part["scale"].unique())
        means = part.groupby(["scale", "reference"])[[x, y]].mean()
        X, Y = (means[c].unstack("reference").reindex(index=scales, columns=refs).to_numpy(float) for c in (x, y))
        out[m] = (scales, X, Y)
    return refs, out


def _curve_gain(xa, ya, xb, yb, points: int = 21):
    """Mean of x_a(y) - x_b(y) over the overlap of the two curves' y ranges (None if they do not overlap).
    Each curve is read as x as a function of y, through its points sorted by y."""
    lo, hi = max(ya.min(), yb.min()), min(ya.max(), yb.max())
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        return None
    grid = np.linspace(lo, hi, points)
    ia, ib = np.argsort(ya), np.argsort(yb)
    return float(np.mean(np.interp(grid, ya[ia], xa[ia]) - np.interp(grid, yb[ib], xb[ib]))), (float(lo), float(hi))


def matched_gain(rows, model: str, baseline: str, *, x: str = "clip_t", y: str = "clip_i",
                 prompt_kind: str | None = EDIT, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> MatchedGain | None:
    """`model`'s x minus `baseline`'s x at matched y (see MatchedGain), with a bootstrap interval that
    resamples the references both models share (the same draw for both: a paired comparison).
    None when a model is missing, has fewer than two scales, or the curves do not overlap in y."""
    frame = _frame(rows)
    if prompt_kind is not None:
        frame = frame[frame["prompt_kind"] == prompt_kind]
    present = set(frame["model"])
    if model not in present or baseline not in present:
        return None
    refs, cells = _cell_means(frame, (model, baseline), x, y)
    if not refs or any(len(cells[m][0]) < 2 for m in (model, baseline)):
        return None

    (_, Xa, Ya), (_, Xb, Yb) = cells[model], cells[baseline]
    point = _curve_gain(np.nanmean(Xa, 1), np.nanmean(Ya, 1), np.nanmean(Xb, 1), np.nanmean(Yb, 1))
    if point is None:
        return None
    lo = hi = math.nan
    if len(refs) >= 2:
        idx = np.random.default_rng(seed).integers(0, len(refs), size=(n_boot, len(refs)))  # same draw for both
        means = [np.nanmean(a[:, idx], axis=2) for a in (Xa, Ya, Xb, Yb)]  # each (scales, n_boot)
        boots = [g[0] for g in (_curve_gain(*(m[:, b] for m in means)) for b in range(n_boot)) if g is not None]
        if len(boots) >= n_boot / 2:  # the curves overlap in most resamples
            lo, hi = (float(v) for v in np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return MatchedGain(model, baseline, point[0], lo, hi, point[1], len(refs), x, y, prompt_kind)


def _short(name: str) -> str:
    return {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}.get(name, name)


def describe_gain(g: MatchedGain, clip_model: str = "") -> str:
    """One sentence for a MatchedGain, numbers included."""
    kind = {EDIT: "edit prompts", OWN: "the references' own captions", None: "all prompts"}[g.prompt_kind]
    sign = "higher" if g.gain >= 0 else "lower"
    if math.isnan(g.low):
        ci, verdict = "no bootstrap interval: too few references, or the curves rarely overlap in resamples", ""
    else:
        ci = f"95% interval {g.low:+.3f} to {g.high:+.3f}"
        verdict = (" - larger than the resampling noise" if g.low > 0 or g.high < 0 else
                   " - within the resampling noise (the interval includes 0)")
    return (f"On {kind}, at matched {_short(g.y)} ({g.y_range[0]:.3f} to {g.y_range[1]:.3f}, where both curves "
            f"overlap), {g.model} has a {_short(g.x)} {abs(g.gain):.3f} {sign} than {g.baseline} "
            f"({ci}, over {g.n_references} references; plain cosine"
            f"{', CLIP ' + clip_model if clip_model else ''}){verdict}.")


def _why_no_overlap(frame, a: str, b: str, y: str, prompt_kind: str | None) -> str:
    """Why matched_gain found nothing: too few scales, or the two curves' y ranges (given) do not meet."""
    if prompt_kind is not None:
        frame = frame[frame["prompt_kind"] == prompt_kind]
    means = {m: frame[frame["model"] == m].groupby("scale")[y].mean() for m in (a, b)}
    if any(len(v) < 2 for v in means.values()):
        return "a curve needs at least two IP scales"
    ranges = ", ".join(f"{m} {v.min():.3f} to {v.max():.3f}" for m, v in means.items())
    return f"their {_short(y)} ranges do not overlap ({ranges})"


def headline(rows, *, model: str = "finetuned-text-aware", baselines: Sequence[str] = ("finetuned-vanilla", "pretrained"),
             prompt_kind: str | None = EDIT, random_weights: bool = False, n_boot: int = 1000, seed: int = 0) -> str:
    """The result in sentences, computed from the rows: `model`'s CLIP-T gain at matched CLIP-I over each
    baseline (and at matched DINO over the first). Says plainly when a model is missing or the curves
    do not overlap. random_weights=True prefixes a warning that the numbers are meaningless."""
    frame = _frame(rows)
    clip_model = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else ""
    present = set(frame["model"])
    lines = []
    if random_weights:
        lines.append("RANDOM WEIGHTS (tiny profile): the numbers below are meaningless; they only show that the code runs.")
    if model not in present:
        others = [m for m in model_order(present)]
        lines.append(f"{model} was not evaluated (no adapter), so there is no headline comparison; "
                     f"evaluated: {', '.join(others)}.")
        if len(others) >= 2:  # still compare what there is: the last against the first
            g = matched_gain(frame, others[-1], others[0], prompt_kind=prompt_kind, n_boot=n_boot, seed=seed)
            if g is not None:
                lines.append(describe_gain(g, clip_model))
        return " ".join(lines)
    lines += [f"{b} was not evaluated (no adapter), so no comparison with it." for b in baselines
              if b != model and b not in present]
    for i, base in enumerate(b for b in baselines if b != model and b in present):
        for y in (("clip_i", "dino") if i == 0 and "dino" in frame else ("clip_i",)):
            g = matched_gain(frame, model, base, y=y, prompt_kind=prompt_kind, n_boot=n_boot, seed=seed)
            if g is None:
                lines.append(f"{model} and {base} cannot be compared at matched {_short(y)}: "
                             f"{_why_no_overlap(frame, model, base, y, prompt_kind)}.")
            else:
                lines.append(describe_gain(g, clip_model))
    return " ".join(lines)


# --------------------------------------------------------------------------------------------------
# Beside the seed project's number
# --------------------------------------------------------------------------------------------------


def seed_comparison(rows, *, scale: float = 1.0, n_boot: int = 2000, seed: int = 0):
    """The seed project's "mean CLIP-T 0.32" beside ours at the IP scale closest to `scale` (the seed
    sampled at 1.0), per model and prompt kind, with what is known about each measurement (DataFrame)."""
    import pandas as pd

    frame = _frame(rows)
    clip_model = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else "?"
    out = [{"source": "seed project (reported)", "model": "its text-aware adapter", "IP scale": 1.0,
            "prompts": "unknown", "CLIP-T (plain cosine)": f"{SEED_PROJECT_CLIP_T:.2f}", "CLIPScore (x100)": "",
            "CLIP model": "unknown", "references": "appear to be training images",
            "caveat": "probably a plain cosine; model, prompts and sample count not given"}]
    scales = sorted(frame["scale"].unique())
    s = min(scales, key=lambda v: abs(v - scale))
    for model in model_order(frame["model"]):
        for kind in (OWN, EDIT):
            cell = frame[(frame["model"] == model) & (frame["scale"] == s) & (frame["prompt_kind"] == kind)]
            if cell.empty:
                continue
            mean, lo, hi = bootstrap_ci(cell["clip_t"], cell["reference"], n_boot=n_boot, seed=seed)
            out.append({"source": "this notebook", "model": model, "IP scale": float(s), "prompts": kind,
                        "CLIP-T (plain cosine)": f"{mean:.3f} [{lo:.3f}, {hi:.3f}]",
                        "CLIPScore (x100)": f"{max(100 * float(cell['clip_t'].mean()), 0):.1f}",
                        "CLIP model": clip_model,
                        "references": f"{cell['reference'].nunique()} held-out test images",
                        "caveat": "mean [95% bootstrap interval over references]"})
    return pd.DataFrame(out)
