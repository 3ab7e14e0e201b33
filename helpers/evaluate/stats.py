"""The statistics of the evaluation: intervals over references, paired differences between models, and the
gain in prompt following at matched consistency (helpers.evaluate.headline writes it up against every baseline).

Input: rows, one per generated image (helpers.evaluate.grid.run_grid's result.rows), with at least model, scale,
reference, prompt, seed, prompt_kind, edit and the metric columns (clip_t, clip_i, dino: plain cosines; and, when
the rows have them, the subject-only scores clip_i_subject, dino_subject, clip_i_background). A NaN score (an
empty mask left the image nothing to compare: helpers.evaluate.metrics) is left out: each reference's mean is
over its images that have the score, a reference with none drops out of that score's interval, and summarize
counts them (`<score>_missing`). Rows that
carry adapter_sha256 must hold one adapter per model: results.csv read back whole may also hold a retrained
model's earlier rows, and those are refused (as_frame) rather than averaged with the current ones.

    bootstrap_ci(values, groups)          mean and 95% t interval over *references* (the name is older than the rule)
    summarize(rows)                       per model and scale: each metric's mean [interval] (pandas DataFrame)
    complete_references(rows, models)     the references where every one of `models` has every image: what a
                                          comparison of a grid stopped part way may use
    paired_difference(rows, a, b, m)      a's metric minus b's on the same images' settings (reference, prompt,
                                          seed, scale), with a paired t interval over references
    matched_gain(rows, a, b)              a's CLIP-T minus b's at matched CLIP-I, along each model's scale curve,
                                          with a paired jackknife-t interval (and bootstrap draws to look at)

Images of one reference are not independent evidence, so every interval is over references; every model sees
the same references, prompts and seeds, so differences between models leave references out, or average them,
*once for both* (paired). One rule for every interval: estimate ± t(R-1) x standard error over the R
references. For a mean the standard error is s/sqrt(R); for the matched gain, not a plain mean, it is the
jackknife's (leave each reference out in turn), which for a mean is exactly s/sqrt(R) again. A percentile
bootstrap over references, which this module used before, covers the truth in only about 90% of simulated
10-reference tables: it uses the normal quantile and the 1/R variance where R - 1 degrees of freedom are due
(tests/evaluate/test_stats.py measures both).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from ..sample.registry import label, model_order

OWN, EDIT = "own caption", "edit"  # prompt kinds: a reference's own caption, or an edit prompt
CATEGORIES = ("setting", "outfit", "action", "style")  # edit categories (helpers.evaluate.protocol.EDIT_PROMPTS)
METRICS = ("clip_t", "clip_i", "dino")  # whole-image scores
SUBJECT_SCORES = ("clip_i_subject", "dino_subject", "clip_i_background")  # on the character / background alone
SCORES = METRICS + SUBJECT_SCORES
N_BOOT = 2000  # bootstrap draws of the matched gain (MatchedGain.boots, for its histogram; not its interval)
LEVEL = 0.95
PAIR_KEYS = ("scale", "reference", "prompt", "seed")  # what two models' images share when they are a pair
IDENTITY = "adapter_sha256"  # the rows' column naming the weights that made them (helpers.evaluate.results)


def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with df (a whole number >= 1) degrees of freedom, e.g. t_quantile(0.975, 9)
    = 2.2622. Exact for df <= 1000: t's distribution function in closed form for whole df (Abramowitz & Stegun
    26.7.3-4, a finite sum in theta = atan(t / sqrt(df))), inverted by bisection on theta. Above, the
    Cornish-Fisher series in 1/df (A&S 26.7.5), within 1e-12 of the exact value there for p <= 0.9995. numpy
    has no t quantile and scipy is not a dependency."""
    if df != int(df) or df < 1 or not 0 < p < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and a whole df >= 1, got p={p}, df={df}")
    df = int(df)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if df > 1000:
        z = NormalDist().inv_cdf(p)
        g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
        return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))
    lo, hi = 0.0, math.pi / 2  # P(|T| < sqrt(df) tan theta) rises from 0 to 1 on [0, pi/2)
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < 2 * p - 1 else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def _t_central(theta: float, df: int) -> float:
    """P(|T| < sqrt(df) tan theta) for T ~ t(df), df whole (A&S 26.7.3 for odd df, 26.7.4 for even)."""
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # s (1 + 1/2 c^2 + 1.3/(2.4) c^4 + ... up to c^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)  # 2/pi (theta + s (c + 2/3 c^3 + 2.4/(3.5) c^5 + ... up to c^(df-2)))
    for k in range(1, (df - 1) // 2):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + s * total)


def t_interval(per_reference, level: float = LEVEL):
    """(mean, low, high) over the last axis of per_reference (..., R), one value per reference: the mean
    plus or minus t(R-1) x s / sqrt(R), s the standard deviation between references (ddof 1). Arrays of shape
    (...,), or floats for a 1-D input; nan bounds when R < 2."""
    x = np.asarray(per_reference, dtype=np.float64)
    n = x.shape[-1]
    mean = x.mean(axis=-1) if n else np.full(x.shape[:-1], math.nan)
    if n < 2:
        return mean, mean * math.nan, mean * math.nan
    half = t_quantile((1 + level) / 2, n - 1) * x.std(axis=-1, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def jackknife_interval(estimate, leave_one_out, level: float = LEVEL):
    """(low, high): estimate plus or minus t(R-1) x the jackknife standard error, for an estimate made from R
    references. estimate (...,); leave_one_out (..., R): the same estimate made without each reference in
    turn. Standard error squared: (R-1)/R x sum over i of (leave_one_out_i - their mean)^2 (for a mean,
    exactly s^2 / R, so the interval is t_interval's). nan where a leave-one-out estimate is nan, or R < 2."""
    loo = np.asarray(leave_one_out, dtype=np.float64)
    n = loo.shape[-1]
    if n < 2:
        return np.asarray(estimate) * math.nan, np.asarray(estimate) * math.nan
    se = np.sqrt((n - 1) / n * ((loo - loo.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1))
    half = t_quantile((1 + level) / 2, n - 1) * se
    return estimate - half, estimate + half


def bootstrap_ci(values, groups=None, *, level: float = LEVEL, seed: int | None = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the per-group means and its t interval over groups (t_interval).

    groups: one label per value (the reference of each image). Values are first averaged per group, so
            images of the same reference never count as independent evidence. Without groups every value is
            its own group. Fewer than two groups: the interval is (nan, nan).
    NaN values (an empty mask's subject scores) are left out first: a group's mean is over its other values, and a
    group with none left drops out.
    seed: no effect (the interval is computed, not drawn); kept for the callers of the bootstrap it replaced.
    """
    values = np.asarray(values, dtype=np.float64)
    if groups is not None:
        groups = np.asarray([str(g) for g in groups])
        if len(groups) != len(values):
            raise ValueError(f"{len(values)} values but {len(groups)} group labels")
        groups = groups[~np.isnan(values)]
    values = values[~np.isnan(values)]
    if groups is not None:
        labels = list(dict.fromkeys(groups.tolist()))
        values = np.array([values[groups == g].mean() for g in labels])
    mean, lo, hi = t_interval(values, level)
    return float(mean), float(lo), float(hi)


def as_frame(rows, *, prompt_kind: str | None = None, edit: str | None = None):
    """rows as a pandas DataFrame, optionally only one prompt kind and/or one edit category."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("no rows to summarise")
    if IDENTITY in frame:
        ids = frame.groupby("model")[IDENTITY].unique()
        mixed = {m: list(v) for m, v in ids.items() if len(v) > 1}
        if mixed:
            raise ValueError(f"rows of more than one adapter per model ({IDENTITY}: {mixed}): results.csv keeps the "
                             "rows of a model's earlier adapter. Use the current rows only (run_grid's result.rows, "
                             f"or the rows whose {IDENTITY} is the bank's).")
    if prompt_kind is not None:
        frame = frame[frame["prompt_kind"] == prompt_kind]
    if edit is not None:
        frame = frame[frame["edit"] == edit]
    return frame


def backbones(rows) -> str:
    """The score backbones and scale, for a table's caption: 'plain cosines; CLIP-T/CLIP-I: CLIP <id>; DINO: <id>'
    (and the segmenter of the subject-only scores, when the rows have one)."""
    frame = as_frame(rows)
    clip = frame["clip_model"].iloc[0] if "clip_model" in frame else "?"
    dino = frame["dino_model"].iloc[0] if "dino_model" in frame else "?"
    seg = (f"; subject and background: masks by {frame['segmenter'].iloc[0]} at threshold "
           f"{float(frame['mask_threshold'].iloc[0]):g}, the rest filled white" if "segmenter" in frame else "")
    return f"plain cosines in [-1, 1]; CLIP-T and CLIP-I: CLIP {clip}; DINO: {dino} (CLS token){seg}"


def complete_references(rows, models: Sequence[str]) -> list[str]:
    """The references (in the rows' order) where every model in `models` has every image of the design: each
    scale and seed of these models' rows, with each prompt any of them has for that reference. A grid stopped part
    way (helpers.evaluate.grid.run_grid) leaves its last references incomplete, or a scale added in a later sitting
    missing from some; a comparison uses only the complete references, so both models are averaged over the same
    references, scales and prompts (paired). Empty when a model has no rows."""
    frame = as_frame(rows)
    part = frame[frame["model"].isin(list(models))]
    if part.empty or set(models) - set(part["model"]):
        return []
    cells = part.drop_duplicates(["reference", "model", "scale", "prompt", "seed"])
    need = part.groupby("reference", sort=False)["prompt"].nunique() * part["scale"].nunique() * part["seed"].nunique()
    have = cells.groupby(["reference", "model"], sort=False).size().unstack("model").reindex(columns=list(models))
    done = have.eq(need.reindex(have.index), axis=0).all(axis=1)
    return [str(r) for r in part["reference"].unique() if done.get(r, False)]


def summarize(rows, *, prompt_kind: str | None = None, edit: str | None = None,
              columns: Sequence[str] | None = None):
    """A table (pandas DataFrame), one line per model and scale: its label, n references and images, and for
    each metric in `columns` (default: every one of SCORES the rows have) its mean with the t interval over
    references (bootstrap_ci: `<m>`, `<m>_lo`, `<m>_hi`; NaN left out), for each subject-only score
    `<m>_missing`, the images without one (an empty mask), plus `clip_t_x100`: torchmetrics' CLIPScore of those
    images and prompts, max(100 x mean cosine, 0), and, when the rows carry it, the adapter_sha256 of the weights
    (the model card keeps only its own adapter's lines).

    prompt_kind: OWN or EDIT to keep only those prompts; edit: one edit category; None for all.
    """
    import pandas as pd

    frame = as_frame(rows, prompt_kind=prompt_kind, edit=edit)
    columns = [m for m in SCORES if m in frame] if columns is None else list(columns)
    if frame.empty:
        raise ValueError(f"no rows with prompt_kind {prompt_kind!r}" + (f" and edit {edit!r}" if edit else ""))
    out = []
    for model in model_order(frame["model"]):
        for scale in sorted(frame.loc[frame["model"] == model, "scale"].unique()):
            cell = frame[(frame["model"] == model) & (frame["scale"] == scale)]
            line = {"model": model, "label": label(model), "scale": float(scale),
                    "n_references": cell["reference"].nunique(), "n_images": len(cell)}
            if IDENTITY in cell:
                line[IDENTITY] = str(cell[IDENTITY].iloc[0])
            for m in columns:
                line[m], line[f"{m}_lo"], line[f"{m}_hi"] = bootstrap_ci(cell[m], cell["reference"])
                if m in SUBJECT_SCORES:
                    line[f"{m}_missing"] = int(cell[m].isna().sum())
            if "clip_t" in columns:
                line["clip_t_x100"] = max(100 * float(cell["clip_t"].mean()), 0.0)
            out.append(line)
    return pd.DataFrame(out)


def format_summary(summary, digits: int = 3):
    """The summary for display: models by label, each metric as 'mean [low, high]' (plain cosine)."""
    import pandas as pd

    shown = summary[["label", "scale", "n_references", "n_images"]].rename(columns={"label": "model"})
    for m in SCORES:
        if m in summary:
            shown[metric_label(m)] = [f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                                for v, lo, hi in zip(summary[m], summary[f"{m}_lo"], summary[f"{m}_hi"])]
    if "clip_t_x100" in summary:
        shown["CLIPScore (x100)"] = summary["clip_t_x100"].round(1)
    if "clip_i_subject_missing" in summary:
        shown["no subject score (empty mask)"] = summary["clip_i_subject_missing"]
    return pd.DataFrame(shown)


# --------------------------------------------------------------------------------------------------
# Paired differences between models
# --------------------------------------------------------------------------------------------------


def paired_difference(rows, model: str, baseline: str, metric: str = "clip_t", *, scale: float | None = None,
                      prompt_kind: str | None = EDIT, edit: str | None = None) -> tuple[float, float, float]:
    """(mean, low, high) of `model`'s metric minus `baseline`'s, image against image: the two images made
    from the same reference, prompt, seed and scale (all scales, or one). The differences are averaged per
    reference and the t interval taken over those R means (bootstrap_ci): what a reference adds to both
    models cancels.
    Raises ValueError when an image of one model has no partner in the other (not a paired design)."""
    frame = as_frame(rows, prompt_kind=prompt_kind, edit=edit)
    if scale is not None:
        frame = frame[np.isclose(frame["scale"].astype(float), float(scale))]
    a, b = (frame[frame["model"] == m].set_index(list(PAIR_KEYS))[metric] for m in (model, baseline))
    if a.empty or b.empty:
        raise ValueError(f"no rows for {model if a.empty else baseline!r} here")
    if a.index.has_duplicates or b.index.has_duplicates:
        raise ValueError("two images of one model share reference, prompt, seed and scale: cannot pair them")
    unpaired = a.index.symmetric_difference(b.index)
    if len(unpaired):
        raise ValueError(f"{len(unpaired)} images of {model} or {baseline} have no partner with the same "
                         f"{', '.join(PAIR_KEYS)}, e.g. {list(unpaired[:2])}")
    diff = a - b.reindex(a.index)
    return bootstrap_ci(diff.to_numpy(), diff.index.get_level_values("reference"))


# --------------------------------------------------------------------------------------------------
# CLIP-T gain at matched CLIP-I (helpers.evaluate.headline puts it in sentences and tables)
# --------------------------------------------------------------------------------------------------


@dataclass
class MatchedGain:
    """How much higher `model`'s x metric is than `baseline`'s at the same y metric, averaged over the
    y range where both curves exist (linear interpolation along each model's curve across scales)."""

    model: str
    baseline: str
    gain: float
    low: float  # jackknife-t interval over references (nan if it could not be estimated)
    high: float
    y_range: tuple[float, float]
    n_references: int
    x: str = "clip_t"
    y: str = "clip_i"
    prompt_kind: str | None = EDIT
    edit: str | None = None  # an edit category, or None for all
    # bootstrap draws of `gain` (references resampled, the same draw for both models), for a histogram of its
    # spread; the interval does not come from them
    boots: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def half_width(self) -> float:
        """Half the interval's width: differences smaller than this cannot be told from zero with this run."""
        return (self.high - self.low) / 2


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


def _interp(at, yp, xp):
    """np.interp over leading axes: at (..., P) points; yp (..., K) increasing; xp (..., K) -> (..., P).
    Written as x_0 plus each segment's slope times the part of it below the point, so a few whole-array
    steps (K - 1) do it for many curves at once; outside [y_0, y_K-1] the end values, as np.interp."""
    out = np.repeat(xp[..., :1], at.shape[-1], axis=-1)
    for j in range(yp.shape[-1] - 1):
        width = yp[..., j + 1:j + 2] - yp[..., j:j + 1]  # (..., 1)
        slope = np.where(width > 0, (xp[..., j + 1:j + 2] - xp[..., j:j + 1]) / np.where(width > 0, width, 1.0), 0.0)
        out += slope * np.clip(at - yp[..., j:j + 1], 0.0, width)
    return out


def curve_gain(xa, ya, xb, yb, points: int = 21):
    """(gain, lo, hi): the mean of x_a(y) - x_b(y) at `points` evenly spaced y over [lo, hi], the overlap of
    the two curves' y ranges; each curve, one point per scale, read as x of y by linear interpolation through
    its points sorted by y. xa, ya: (..., Ka); xb, yb: (..., Kb), Ka, Kb >= 2. Each result (...,); gain nan
    where the ranges do not overlap or a point is nan."""
    xa, ya, xb, yb = (np.asarray(a, dtype=np.float64) for a in (xa, ya, xb, yb))
    lo, hi = np.maximum(ya.min(-1), yb.min(-1)), np.minimum(ya.max(-1), yb.max(-1))
    ok = np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
    at = np.linspace(np.where(ok, lo, 0.0), np.where(ok, hi, 1.0), points, axis=-1)  # (..., points)
    ia, ib = np.argsort(ya, -1), np.argsort(yb, -1)
    along = np.take_along_axis  # each curve's points in increasing y
    diff = _interp(at, along(ya, ia, -1), along(xa, ia, -1)) - _interp(at, along(yb, ib, -1), along(xb, ib, -1))
    return np.where(ok, diff.mean(-1), np.nan), lo, hi


def _nanmean(a, axis):
    """np.nanmean without its warning for an all-nan slice (that slice is nan)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def leave_one_out_means(a):
    """a (..., S, R) per-reference means -> (..., R, S): row i the mean over the references other than i
    (nan cells skipped, as np.nanmean)."""
    a = np.asarray(a, dtype=np.float64)
    seen = np.isfinite(a)
    total, count = np.where(seen, a, 0.0).sum(-1, keepdims=True), seen.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        loo = (total - np.where(seen, a, 0.0)) / (count - seen)
    return np.swapaxes(loo, -1, -2)


def matched_gain_interval(Xa, Ya, Xb, Yb, level: float = LEVEL):
    """The matched gain and its interval from per-reference means, over any leading axes (many tables at
    once). Xa, Ya: (..., Sa, R) `model`'s x and y per scale and reference; Xb, Yb: (..., Sb, R) `baseline`'s,
    the same R references in the same order. Returns (gain, low, high, y_lo, y_hi), each (...,): the gain of
    the curves of the means (curve_gain) and its jackknife-t interval (jackknife_interval over the gains of
    the curves without each reference in turn, both models leaving out the same one)."""
    gain, y_lo, y_hi = curve_gain(*(_nanmean(a, -1) for a in (Xa, Ya, Xb, Yb)))
    loo, _, _ = curve_gain(*(leave_one_out_means(a) for a in (Xa, Ya, Xb, Yb)))  # (..., R)
    low, high = jackknife_interval(gain, loo, level)
    return gain, low, high, y_lo, y_hi


def matched_gain(rows, model: str, baseline: str, *, x: str = "clip_t", y: str = "clip_i",
                 prompt_kind: str | None = EDIT, edit: str | None = None, seed: int = 0) -> MatchedGain | None:
    """`model`'s x minus `baseline`'s x at matched y (see MatchedGain), with the jackknife-t interval over
    the references complete for both models (complete_references; matched_gain_interval), and N_BOOT bootstrap
    draws of the gain (seeded by `seed`; the same resample for both models) to look at. None when a model is
    missing, has fewer than two scales, or the curves do not overlap in y."""
    frame = as_frame(rows, prompt_kind=prompt_kind, edit=edit)
    present = set(frame["model"])
    if model not in present or baseline not in present:
        return None
    frame = frame[frame["reference"].isin(complete_references(frame, (model, baseline)))]  # a grid stopped part way
    refs, cells = _cell_means(frame, (model, baseline), x, y)
    if not refs or any(len(cells[m][0]) < 2 for m in (model, baseline)):
        return None

    (_, Xa, Ya), (_, Xb, Yb) = cells[model], cells[baseline]
    gain, low, high, y_lo, y_hi = (float(v) for v in matched_gain_interval(Xa, Ya, Xb, Yb))
    if math.isnan(gain):
        return None
    boots = np.zeros(0)
    if len(refs) >= 2:
        idx = np.random.default_rng(seed).integers(0, len(refs), size=(N_BOOT, len(refs)))  # same draw for both
        drawn = (np.swapaxes(_nanmean(a[:, idx], axis=2), 0, 1) for a in (Xa, Ya, Xb, Yb))  # each (N_BOOT, scales)
        boots = curve_gain(*drawn)[0]
        boots = boots[np.isfinite(boots)]  # the draws where the curves overlap
    return MatchedGain(model, baseline, gain, low, high, (y_lo, y_hi), len(refs), x, y, prompt_kind, edit, boots)


def metric_label(name: str) -> str:
    """'clip_t' -> 'CLIP-T', 'clip_i' -> 'CLIP-I', 'dino' -> 'DINO', 'clip_i_subject' -> 'CLIP-I subject', ...
    (other names as they are)."""
    return {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "clip_i_subject": "CLIP-I subject",
            "dino_subject": "DINO subject", "clip_i_background": "CLIP-I background"}.get(name, name)
