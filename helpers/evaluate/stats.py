"""The statistics of the evaluation: intervals over references, paired differences between models, and the
gain in prompt following at matched consistency (helpers.evaluate.headline writes it up against every baseline).

Input: rows, one per generated image (helpers.evaluate.grid.run_grid's result.rows), with at least model, scale,
reference, prompt, seed, prompt_kind, edit and the metric columns (clip_t, clip_i, dino: plain cosines). Rows that
carry adapter_sha256 must hold one adapter per model: results.csv read back whole may also hold a retrained
model's earlier rows, and those are refused (as_frame) rather than averaged with the current ones.

    bootstrap_ci(values, groups)          mean and 95% percentile bootstrap interval, resampling *references*
    summarize(rows)                       per model and scale: each metric's mean [interval] (pandas DataFrame)
    paired_difference(rows, a, b, m)      a's metric minus b's on the same images' settings (reference, prompt,
                                          seed, scale), with a paired bootstrap interval over references
    matched_gain(rows, a, b)              a's CLIP-T minus b's at matched CLIP-I, along each model's scale curve,
                                          with a paired bootstrap interval (and its bootstrap draws)

Images of one reference are not independent evidence, so every interval resamples references; every model
sees the same references, prompts and seeds, so differences between models resample the references *once
for both* (paired). One number of bootstrap draws throughout: N_BOOT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..sample.registry import label, model_order

OWN, EDIT = "own caption", "edit"  # prompt kinds: a reference's own caption, or an edit prompt
CATEGORIES = ("setting", "outfit", "action", "style")  # edit categories (helpers.evaluate.protocol.EDIT_PROMPTS)
METRICS = ("clip_t", "clip_i", "dino")
N_BOOT = 2000  # bootstrap draws, for every interval in this module
LEVEL = 0.95
PAIR_KEYS = ("scale", "reference", "prompt", "seed")  # what two models' images share when they are a pair
IDENTITY = "adapter_sha256"  # the rows' column naming the weights that made them (helpers.evaluate.results)


def bootstrap_ci(values, groups=None, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
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
    """The score backbones and scale, for a table's caption: 'plain cosines; CLIP-T/CLIP-I: CLIP <id>; DINO: <id>'."""
    frame = as_frame(rows)
    clip = frame["clip_model"].iloc[0] if "clip_model" in frame else "?"
    dino = frame["dino_model"].iloc[0] if "dino_model" in frame else "?"
    return f"plain cosines in [-1, 1]; CLIP-T and CLIP-I: CLIP {clip}; DINO: {dino} (CLS token)"


def summarize(rows, *, prompt_kind: str | None = None, edit: str | None = None, columns: Sequence[str] = METRICS):
    """A table (pandas DataFrame), one line per model and scale: its label, n references and images, and for
    each metric in `columns` its mean with the bootstrap interval over references (`<m>`, `<m>_lo`, `<m>_hi`),
    plus `clip_t_x100`: torchmetrics' CLIPScore of those images and prompts, max(100 x mean cosine, 0), and,
    when the rows carry it, the adapter_sha256 of the weights (the model card keeps only its own adapter's lines).

    prompt_kind: OWN or EDIT to keep only those prompts; edit: one edit category; None for all.
    """
    import pandas as pd

    frame = as_frame(rows, prompt_kind=prompt_kind, edit=edit)
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
            if "clip_t" in columns:
                line["clip_t_x100"] = max(100 * float(cell["clip_t"].mean()), 0.0)
            out.append(line)
    return pd.DataFrame(out)


def format_summary(summary, digits: int = 3):
    """The summary for display: models by label, each metric as 'mean [low, high]' (plain cosine)."""
    import pandas as pd

    shown = summary[["label", "scale", "n_references", "n_images"]].rename(columns={"label": "model"})
    for m in METRICS:
        if m in summary:
            shown[metric_label(m)] = [f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                                for v, lo, hi in zip(summary[m], summary[f"{m}_lo"], summary[f"{m}_hi"])]
    if "clip_t_x100" in summary:
        shown["CLIPScore (x100)"] = summary["clip_t_x100"].round(1)
    return pd.DataFrame(shown)


# --------------------------------------------------------------------------------------------------
# Paired differences between models
# --------------------------------------------------------------------------------------------------


def paired_difference(rows, model: str, baseline: str, metric: str = "clip_t", *, scale: float | None = None,
                      prompt_kind: str | None = EDIT, edit: str | None = None, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of `model`'s metric minus `baseline`'s, image against image: the two images made
    from the same reference, prompt, seed and scale (all scales, or one). The differences are averaged per
    reference and the references resampled (bootstrap_ci), so both models are resampled together.
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
    return bootstrap_ci(diff.to_numpy(), diff.index.get_level_values("reference"), seed=seed)


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
    low: float  # bootstrap interval over references (nan if it could not be estimated)
    high: float
    y_range: tuple[float, float]
    n_references: int
    x: str = "clip_t"
    y: str = "clip_i"
    prompt_kind: str | None = EDIT
    edit: str | None = None  # an edit category, or None for all
    boots: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # the bootstrap draws of `gain`

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
                 prompt_kind: str | None = EDIT, edit: str | None = None, seed: int = 0) -> MatchedGain | None:
    """`model`'s x minus `baseline`'s x at matched y (see MatchedGain), with a bootstrap interval that
    resamples the references both models share (the same draw for both: a paired comparison), N_BOOT draws.
    None when a model is missing, has fewer than two scales, or the curves do not overlap in y."""
    frame = as_frame(rows, prompt_kind=prompt_kind, edit=edit)
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
    boots = np.zeros(0)
    if len(refs) >= 2:
        idx = np.random.default_rng(seed).integers(0, len(refs), size=(N_BOOT, len(refs)))  # same draw for both
        means = [np.nanmean(a[:, idx], axis=2) for a in (Xa, Ya, Xb, Yb)]  # each (scales, N_BOOT)
        boots = np.array([g[0] for g in (_curve_gain(*(m[:, b] for m in means)) for b in range(N_BOOT)) if g is not None])
        if len(boots) >= N_BOOT / 2:  # the curves overlap in most resamples
            lo, hi = (float(v) for v in np.quantile(boots, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))
    return MatchedGain(model, baseline, point[0], lo, hi, point[1], len(refs), x, y, prompt_kind, edit, boots)


def metric_label(name: str) -> str:
    """'clip_t' -> 'CLIP-T', 'clip_i' -> 'CLIP-I', 'dino' -> 'DINO' (other names as they are)."""
    return {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}.get(name, name)
