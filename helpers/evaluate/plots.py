"""Notebook 05's figures: what a reader would rather look at than read. Each returns a matplotlib Figure or a
PIL image (tests check what they hold); models are labelled by what they are (helpers.sample.registry.label).

    tradeoff_plot(summary)                 CLIP-I, DINO and subject CLIP-I (the character alone) against CLIP-T,
                                           one curve per model through its IP scales, 95% interval bars over
                                           references
    side_by_side(samples)                  rows: (reference, edit prompt); columns: the reference, then each model
    category_grids(rows, prompts, load)    one side_by_side per edit category (setting, outfit, action, style)
    scale_sweep(samples, ref, prompt)      one reference and prompt: models down, IP scales across
    bootstrap_histogram(gains)             the bootstrap draws of the headline difference, its t interval and zero
    seed_comparison(rows)                  the seed project's "CLIP-T 0.32" (and the IP-Adapter paper's 0.588)
                                           beside ours, with why they are not comparable
    save_figure(fig_or_image, path)        either one written atomically (helpers.evaluate.outputs names the files)
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..sample.gallery import image_grid
from ..support.atomic import replacing
from ..sample.registry import BASELINES, label, model_order
from .protocol import PromptSpec
from .stats import CATEGORIES, EDIT, N_BOOT, OWN, MatchedGain, bootstrap_ci

SEED_PROJECT_CLIP_T = 0.32  # the seed project's reported "mean CLIP-T" (plain cosine; model and prompts unknown)
IP_ADAPTER_TABLE1_CLIP_T = 0.588  # Ye et al. 2023, Table 1 (COCO val): empty text prompt, rescaled score
METRIC_LABELS = {"clip_t": "CLIP-T (image vs prompt)", "clip_i": "CLIP-I (image vs reference)",
                 "dino": "DINO (image vs reference)", "clip_i_subject": "CLIP-I subject (character vs character)",
                 "dino_subject": "DINO subject (character vs character)",
                 "clip_i_background": "CLIP-I background (background vs background)"}


def save_figure(figure, path, **savefig_kwargs):
    """Write a matplotlib Figure (figure.savefig, e.g. dpi=150, bbox_inches="tight") or a PIL image to `path`
    atomically (helpers.support.atomic.replacing: beside it, then renamed over it), the format from the suffix,
    so a reader (the model card reads tradeoff.png) sees the old file or the new one, never half of one; a full
    disk raises DiskFull naming the file. Returns the path."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with replacing(path) as tmp:
        if isinstance(figure, Image.Image):
            figure.save(tmp, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **savefig_kwargs)
        else:
            figure.savefig(tmp, format=fmt, **savefig_kwargs)
    return path


def _axis_label(metric: str, clip_model: str, dino_model: str) -> str:
    backbone = dino_model if metric.startswith("dino") else clip_model
    return f"{METRIC_LABELS.get(metric, metric)}\nplain cosine" + (f", {backbone}" if backbone else "")


def tradeoff_plot(summary, *, y: Sequence[str] = ("clip_i", "dino", "clip_i_subject"), x: str = "clip_t",
                  title: str | None = None, clip_model: str = "", dino_model: str = "", note: str = "",
                  copy_clip_t: float | None = None):
    """One panel per consistency metric in `y` that the summary has, against `x` (CLIP-T): one curve per model
    through its IP scales (labelled at each point), 95% t intervals over references as error bars; baselines and
    ablations dashed. Up and to the right is better: more like the reference and more like the prompt. The
    subject panel (CLIP-I of the character alone, helpers.evaluate.metrics) tells a kept character from a copied
    picture, which whole-image CLIP-I and DINO reward alike.

    summary: helpers.evaluate.stats.summarize(rows, prompt_kind=...); clip_model / dino_model: named on the axes.
    copy_clip_t: CLIP-T of the unedited references with the same prompts (helpers.evaluate.protocol.copy_baseline),
    drawn as a dashed line: left of it, an image follows the prompt less than the reference itself does."""
    import matplotlib.pyplot as plt

    ys = [m for m in ([y] if isinstance(y, str) else y) if m in summary]
    fig, axes = plt.subplots(1, len(ys), figsize=(5.6 * len(ys), 4.8), squeeze=False)
    for ax, ym in zip(axes[0], ys):
        for model in model_order(summary["model"]):
            part = summary[summary["model"] == model].sort_values("scale")
            xerr = np.abs(np.array([part[x] - part[f"{x}_lo"], part[f"{x}_hi"] - part[x]]))
            yerr = np.abs(np.array([part[ym] - part[f"{ym}_lo"], part[f"{ym}_hi"] - part[ym]]))
            ax.errorbar(part[x], part[ym], xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), marker="o",
                        capsize=3, elinewidth=0.8, label=label(model), linestyle="--" if model in BASELINES else "-")
            for _, r in part.iterrows():
                ax.annotate(f"{r['scale']:g}", (r[x], r[ym]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if copy_clip_t is not None:
            ax.axvline(copy_clip_t, color="grey", linestyle="--", linewidth=1)
            ax.annotate("reference itself", (copy_clip_t, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="grey")
        ax.set_xlabel(_axis_label(x, clip_model, dino_model))
        ax.set_ylabel(_axis_label(ym, clip_model, dino_model))
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="model (labels: IP scale)", fontsize=8)
    heading = title or "Consistency vs prompt following across IP-Adapter scales (95% intervals over references)"
    fig.suptitle(heading + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    return fig


def _labelled(samples) -> list:
    """Copies of the samples with `model` replaced by its label (for grid headings), in model_order."""
    order = model_order([s.model for s in samples])
    ordered = sorted(samples, key=lambda s: order.index(s.model))
    return [dataclasses.replace(s, model=label(s.model)) for s in ordered]


def side_by_side(samples, *, scale: float | None = None, n_rows: int = 4, prompt_kind: str = EDIT,
                 edit: str | None = None, prompts: Sequence[PromptSpec] = (), cell: int | None = None,
                 title: str | None = None) -> Image.Image:
    """A labelled grid (PIL image): rows = (reference, prompt) pairs (up to n_rows, distinct references,
    `prompt_kind` prompts first, only category `edit` if given), columns = the reference then each model
    (by label), at one IP scale (default: the scale closest to 0.5) and the first seed. Every model in a
    row was given the same reference, prompt and seed."""
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to show")
    scales = sorted({float(s.scale) for s in samples})
    scale = min(scales, key=lambda v: abs(v - 0.5)) if scale is None else float(scale)
    seed = min(s.seed for s in samples)
    spec = {(p.reference, p.prompt): p for p in prompts}
    pairs = list(dict.fromkeys((s.reference, s.prompt) for s in samples))
    if edit is not None:
        pairs = [rp for rp in pairs if rp in spec and spec[rp].edit == edit]
    pairs.sort(key=lambda rp: (spec[rp].kind if rp in spec else EDIT) != prompt_kind)  # stable: wanted kind first
    chosen, seen = [], set()
    for ref, prompt in pairs:
        if ref not in seen and len(chosen) < n_rows:
            chosen.append((ref, prompt))
            seen.add(ref)
    if not chosen:
        raise ValueError(f"no samples with edit category {edit!r}")
    keep = [s for s in samples if float(s.scale) == scale and s.seed == seed and (s.reference, s.prompt) in chosen]
    keep.sort(key=lambda s: chosen.index((s.reference, s.prompt)))
    return image_grid(_labelled(keep), rows=("reference", "prompt"), cols=("model",), cell=cell,
                      title=title or f"IP-Adapter scale {scale:g}, seed {seed}")


def category_grids(rows, prompts: Sequence[PromptSpec], load: Callable, *, scale: float | None = None,
                   n_rows: int = 3, categories: Sequence[str] = CATEGORIES, cell: int | None = None) -> dict:
    """{edit category: side_by_side grid} for every category that has edit prompts. rows: the grid's rows
    (helpers.evaluate.grid.GridResult.rows); load(rows) -> Samples (GridResult.samples): only the images shown are
    loaded. Same scale rule and seed as side_by_side."""
    scales = sorted({float(r["scale"]) for r in rows})
    scale = min(scales, key=lambda v: abs(v - 0.5)) if scale is None else float(scale)
    seed = min(int(r["seed"]) for r in rows)
    out = {}
    for cat in categories:
        pairs = [(p.reference, p.prompt) for p in prompts if p.kind == EDIT and p.edit == cat]
        chosen = list({ref: (ref, prompt) for ref, prompt in reversed(pairs)}.values())[::-1][:n_rows]
        picked = [r for r in rows if (r["reference"], r["prompt"]) in chosen and float(r["scale"]) == scale
                  and int(r["seed"]) == seed]
        if picked:
            out[cat] = side_by_side(load(picked), scale=scale, n_rows=n_rows, edit=cat, prompts=prompts, cell=cell,
                                    title=f"{cat} edits · IP-Adapter scale {scale:g}, seed {seed}")
    return out


def scale_sweep(samples, reference: str, prompt: str, *, seed: int | None = None, cell: int | None = None,
                title: str | None = None) -> Image.Image:
    """One reference and prompt: models (by label) down, IP scales across (PIL image via image_grid)."""
    keep = [s for s in samples if s.reference == reference and s.prompt == prompt]
    if not keep:
        raise ValueError(f"no samples for reference {reference!r} with prompt {prompt!r}")
    seed = min(s.seed for s in keep) if seed is None else seed
    keep = sorted((s for s in keep if s.seed == seed), key=lambda s: s.scale)
    return image_grid(_labelled(keep), rows=("model",), cols=("scale",), cell=cell, thumbnails=False,
                      title=title or textwrap.shorten(f"{reference}: {prompt}", 90))


def bootstrap_histogram(gains: Sequence[MatchedGain], *, title: str | None = None):
    """One panel per comparison: the bootstrap draws of `model`'s CLIP-T gain at matched CLIP-I over a
    baseline (MatchedGain.boots), the point estimate, the 95% jackknife-t interval (shaded; the one the
    headline reports, usually wider than the middle 95% of the draws) and zero (red). A difference this run can
    resolve keeps zero outside the shaded band. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    gains = [g for g in gains if g is not None and len(g.boots)]
    if not gains:
        raise ValueError("no bootstrap draws to show (too few references, or the curves never overlap)")
    fig, axes = plt.subplots(1, len(gains), figsize=(4.2 * len(gains), 3.4), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], gains):
        low, high = float(np.min(g.boots)), float(np.max(g.boots))
        if high - low < 1e-6:  # draws (nearly) all equal: numpy cannot cut so small a range into 40 bins
            low, high = low - 5e-4, high + 5e-4
        ax.hist(g.boots, bins=40, range=(low, high), color="tab:blue", alpha=0.7)
        if np.isfinite([g.low, g.high]).all():
            ax.axvspan(g.low, g.high, color="tab:blue", alpha=0.12, label="95% t interval")
        ax.axvline(g.gain, color="black", linewidth=1.2, label=f"estimate {g.gain:+.3f}")
        ax.axvline(0, color="tab:red", linewidth=1.5, label="zero: no difference")
        ax.set_title(textwrap.fill(f"{label(g.model)} - {label(g.baseline)}", 40), fontsize=9)
        ax.set_xlabel(f"CLIP-T gain at matched {g.y.replace('clip_i', 'CLIP-I').replace('dino', 'DINO')}")
        ax.legend(fontsize=7)
    kept = max(len(g.boots) for g in gains)
    axes[0][0].set_ylabel(f"bootstrap draws ({kept} of {N_BOOT}" + (" with overlapping curves)" if kept < N_BOOT else ")"))
    fig.suptitle(title or "Paired bootstrap over references: the headline difference", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Beside the seed project's number (a display table)
# --------------------------------------------------------------------------------------------------


def seed_comparison(rows, *, scale: float = 1.0, seed: int = 0):
    """The seed project's "mean CLIP-T 0.32" and the IP-Adapter paper's 0.588 beside ours at the IP scale
    closest to `scale` (both sampled at 1.0), per model and prompt kind, with what is known about each
    measurement and why the published ones are not comparable (DataFrame)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    clip_model = str(frame["clip_model"].iloc[0]) if "clip_model" in frame else "?"
    out = [{"source": "seed project (reported)", "model": "its text-aware adapter", "IP scale": 1.0,
            "prompts": "unknown", "CLIP-T (plain cosine)": f"{SEED_PROJECT_CLIP_T:.2f}", "CLIPScore (x100)": "",
            "CLIP model": "unknown", "references": "appear to be training images",
            "caveat": "not comparable: CLIP model, prompts and sample count not given; training images can be "
                      "reproduced from memory; one scale, no interval"},
           {"source": "IP-Adapter paper, Table 1", "model": "IP-Adapter (SD 1.5)", "IP scale": 1.0,
            "prompts": "empty text prompt; scored against the COCO caption", "CLIP-T (plain cosine)": "",
            "CLIPScore (x100)": "", "CLIP model": "ViT-L/14", "references": "COCO 2017 val",
            "caveat": f"not comparable: reports {IP_ADAPTER_TABLE1_CLIP_T}, a rescaled score (the scale suggests "
                      "2.5 x cosine), for images made without any text prompt"}]
    scales = sorted(frame["scale"].unique())
    s = min(scales, key=lambda v: abs(v - scale))
    for model in model_order(frame["model"]):
        for kind in (OWN, EDIT):
            cell = frame[(frame["model"] == model) & (frame["scale"] == s) & (frame["prompt_kind"] == kind)]
            if cell.empty:
                continue
            mean, lo, hi = bootstrap_ci(cell["clip_t"], cell["reference"], seed=seed)
            out.append({"source": "this notebook", "model": label(model), "IP scale": float(s), "prompts": kind,
                        "CLIP-T (plain cosine)": f"{mean:.3f} [{lo:.3f}, {hi:.3f}]",
                        "CLIPScore (x100)": f"{max(100 * float(cell['clip_t'].mean()), 0):.1f}",
                        "CLIP model": clip_model,
                        "references": f"{cell['reference'].nunique()} held-out test images",
                        "caveat": "mean [95% t interval over references]"})
    return pd.DataFrame(out)
