"""helpers.stats: intervals resample references, the headline is computed from the rows, the tables add up."""
import numpy as np
import pandas as pd
import pytest

from helpers import evaluation as ev
from helpers import figures, stats


def test_bootstrap_contains_the_mean_and_narrows_with_more_references():
    rng = np.random.default_rng(0)
    widths = []
    for n in (8, 200):
        values = rng.normal(0.3, 0.05, n)
        mean, lo, hi = stats.bootstrap_ci(values, seed=1)
        assert lo < mean < hi and mean == pytest.approx(values.mean())
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_references_not_images():
    rng = np.random.default_rng(1)
    per_reference = rng.normal(0.3, 0.05, 10)
    # 50 images per reference, nearly identical: they are not 500 independent samples
    values = np.repeat(per_reference, 50) + rng.normal(0, 1e-6, 500)
    groups = np.repeat([f"ref{i}" for i in range(10)], 50)
    grouped = stats.bootstrap_ci(values, groups, seed=2)
    alone = stats.bootstrap_ci(per_reference, seed=2)
    assert grouped == pytest.approx(alone, abs=1e-5)
    naive = stats.bootstrap_ci(values, seed=2)
    assert naive[2] - naive[1] < (grouped[2] - grouped[1]) / 3
    assert np.isnan(stats.bootstrap_ci([0.3, 0.4], ["a", "a"])[1])  # one reference: no interval


def synthetic_rows(offsets, n_refs=12, scales=(0.3, 0.5, 0.7, 1.0), seed=0):
    """Rows whose curves have the same shape, model m shifted by offsets[m] along CLIP-T."""
    rng = np.random.default_rng(seed)
    ref_t, ref_i = rng.normal(0, 0.01, n_refs), rng.normal(0, 0.01, n_refs)
    rows = []
    for model, off in offsets.items():
        for s in scales:
            for r in range(n_refs):
                for kind in (ev.OWN, ev.EDIT):
                    rows.append({"model": model, "scale": s, "reference": f"ref{r}", "prompt": kind, "prompt_kind": kind,
                                 "seed": 0, "clip_t": 0.32 - 0.08 * s + off + ref_t[r], "clip_i": 0.6 + 0.3 * s + ref_i[r],
                                 "dino": 0.4 + 0.4 * s + ref_i[r], "clip_model": "tiny-clip"})
    return rows


def test_headline_is_computed_from_the_rows():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-vanilla": 0.01, "finetuned-text-aware": 0.03})
    g = stats.matched_gain(rows, "finetuned-text-aware", "finetuned-vanilla")
    assert g.gain == pytest.approx(0.02, abs=1e-9) and g.low <= g.gain <= g.high and g.n_references == 12
    text = stats.headline(rows)
    assert f"{g.gain:.3f} higher than finetuned-vanilla" in text and "tiny-clip" in text
    # change the rows: the headline follows
    for r in rows:
        if r["model"] == "finetuned-text-aware":
            r["clip_t"] -= 0.05
    g2 = stats.matched_gain(rows, "finetuned-text-aware", "finetuned-vanilla")
    assert g2.gain == pytest.approx(g.gain - 0.05, abs=1e-9)
    assert stats.headline(rows) != text and f"{abs(g2.gain):.3f} lower than finetuned-vanilla" in stats.headline(rows)
    assert stats.headline(rows, random_weights=True).startswith("RANDOM WEIGHTS")


def test_headline_says_when_a_model_is_missing_or_curves_do_not_meet():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-vanilla": 0.01})
    text = stats.headline(rows)
    assert "finetuned-text-aware was not evaluated" in text and "finetuned-vanilla has a CLIP-T" in text
    apart = synthetic_rows({"finetuned-vanilla": 0.0, "finetuned-text-aware": 0.0})
    for r in apart:
        if r["model"] == "finetuned-text-aware":
            r["clip_i"] += 1.0  # no CLIP-I in common
    assert stats.matched_gain(apart, "finetuned-text-aware", "finetuned-vanilla") is None
    assert "cannot be compared at matched CLIP-I: their CLIP-I ranges do not overlap" in stats.headline(apart)


def test_summary_plot_and_seed_table():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": 0.03}, n_refs=5)
    summary = stats.summarize(rows, prompt_kind=ev.EDIT, n_boot=200)
    assert len(summary) == 2 * 4 and (summary["n_references"] == 5).all() and (summary["n_images"] == 5).all()
    frame = pd.DataFrame(rows)
    cell = frame[(frame["model"] == "pretrained") & (frame["scale"] == 0.5) & (frame["prompt_kind"] == ev.EDIT)]
    line = summary[(summary["model"] == "pretrained") & (summary["scale"] == 0.5)].iloc[0]
    assert line["clip_t"] == pytest.approx(cell["clip_t"].mean()) and line["clip_t_lo"] <= line["clip_t"] <= line["clip_t_hi"]
    assert line["clip_t_x100"] == pytest.approx(100 * cell["clip_t"].mean())
    fig = figures.tradeoff_plot(summary, clip_model="tiny-clip")
    assert len(fig.axes) == 2 and [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["pretrained", "finetuned-text-aware"]
    table = stats.seed_comparison(rows)
    assert table["CLIP-T (plain cosine)"].iloc[0] == f"{stats.SEED_PROJECT_CLIP_T:.2f}" and len(table) == 1 + 2 * 2
