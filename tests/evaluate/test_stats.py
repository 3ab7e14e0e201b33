"""helpers.stats: intervals resample references, differences between models are paired, the headline is
computed from the rows (overall and per edit category), the tables add up."""
import numpy as np
import pandas as pd
import pytest

from helpers.evaluate.plots import SEED_PROJECT_CLIP_T, seed_comparison
from helpers.evaluate.stats import (
    CATEGORIES,
    EDIT,
    METRICS,
    N_BOOT,
    OWN,
    bootstrap_ci,
    format_summary,
    headline,
    headline_table,
    matched_gain,
    paired_difference,
    summarize,
)
from helpers.sample.registry import label


def test_bootstrap_contains_the_mean_and_narrows_with_more_references():
    rng = np.random.default_rng(0)
    widths = []
    for n in (8, 200):
        values = rng.normal(0.3, 0.05, n)
        mean, lo, hi = bootstrap_ci(values, seed=1)
        assert lo < mean < hi and mean == pytest.approx(values.mean())
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_references_not_images():
    rng = np.random.default_rng(1)
    per_reference = rng.normal(0.3, 0.05, 10)
    # 50 images per reference, nearly identical: they are not 500 independent samples
    values = np.repeat(per_reference, 50) + rng.normal(0, 1e-6, 500)
    groups = np.repeat([f"ref{i}" for i in range(10)], 50)
    grouped = bootstrap_ci(values, groups, seed=2)
    alone = bootstrap_ci(per_reference, seed=2)
    assert grouped == pytest.approx(alone, abs=1e-5)
    naive = bootstrap_ci(values, seed=2)
    assert naive[2] - naive[1] < (grouped[2] - grouped[1]) / 3
    assert np.isnan(bootstrap_ci([0.3, 0.4], ["a", "a"])[1])  # one reference: no interval


def synthetic_rows(offsets, n_refs=12, scales=(0.3, 0.5, 0.7, 1.0), seed=0, noise=0.0):
    """Rows whose curves have the same shape, model m shifted by offsets[m] along CLIP-T (a number, or
    {edit category: number}); each reference has its own caption and one edit of a category in turn.
    noise: per-image noise on CLIP-T, independent between models."""
    rng = np.random.default_rng(seed)
    ref_t, ref_i = rng.normal(0, 0.01, n_refs), rng.normal(0, 0.01, n_refs)
    rows = []
    for model, off in offsets.items():
        for s in scales:
            for r in range(n_refs):
                cat = CATEGORIES[r % 4]
                for kind, edit in ((OWN, ""), (EDIT, cat)):
                    shift = off.get(edit, 0.0) if isinstance(off, dict) else off
                    rows.append({"model": model, "scale": s, "reference": f"ref{r}", "prompt": f"{kind} {edit}",
                                 "prompt_kind": kind, "edit": edit, "seed": 0,
                                 "clip_t": 0.32 - 0.08 * s + shift + ref_t[r] + rng.normal(0, noise),
                                 "clip_i": 0.6 + 0.3 * s + ref_i[r], "dino": 0.4 + 0.4 * s + ref_i[r],
                                 "clip_model": "tiny-clip", "dino_model": "tiny-dino"})
    return rows


def test_headline_is_computed_from_the_rows():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-vanilla": 0.01, "finetuned-text-aware": 0.03})
    g = matched_gain(rows, "finetuned-text-aware", "finetuned-vanilla")
    assert g.gain == pytest.approx(0.02, abs=1e-9) and g.low <= g.gain <= g.high and g.n_references == 12
    assert len(g.boots) == N_BOOT  # one number of draws throughout
    text = headline(rows)
    assert f"{g.gain:.3f} higher than {label('finetuned-vanilla')}" in text and "tiny-clip" in text
    # change the rows: the headline follows
    for r in rows:
        if r["model"] == "finetuned-text-aware":
            r["clip_t"] -= 0.05
    g2 = matched_gain(rows, "finetuned-text-aware", "finetuned-vanilla")
    assert g2.gain == pytest.approx(g.gain - 0.05, abs=1e-9)
    assert headline(rows) != text and f"{abs(g2.gain):.3f} lower than {label('finetuned-vanilla')}" in headline(rows)
    assert headline(rows, random_weights=True).startswith("RANDOM WEIGHTS")


def test_headline_says_when_a_model_is_missing_or_curves_do_not_meet():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-vanilla": 0.01})
    text = headline(rows)
    assert f"{label('finetuned-text-aware')} was not evaluated" in text
    assert f"{label('finetuned-vanilla')} has a CLIP-T" in text
    apart = synthetic_rows({"finetuned-vanilla": 0.0, "finetuned-text-aware": 0.0})
    for r in apart:
        if r["model"] == "finetuned-text-aware":
            r["clip_i"] += 1.0  # no CLIP-I in common
    assert matched_gain(apart, "finetuned-text-aware", "finetuned-vanilla") is None
    assert "cannot be compared at matched CLIP-I: their CLIP-I ranges do not overlap" in headline(apart)


def test_summary_plot_and_seed_table():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": 0.03}, n_refs=5)
    summary = summarize(rows, prompt_kind=EDIT)
    assert len(summary) == 2 * 4 and (summary["n_references"] == 5).all() and (summary["n_images"] == 5).all()
    frame = pd.DataFrame(rows)
    cell = frame[(frame["model"] == "pretrained") & (frame["scale"] == 0.5) & (frame["prompt_kind"] == EDIT)]
    line = summary[(summary["model"] == "pretrained") & (summary["scale"] == 0.5)].iloc[0]
    assert line["clip_t"] == pytest.approx(cell["clip_t"].mean()) and line["clip_t_lo"] <= line["clip_t"] <= line["clip_t_hi"]
    assert line["clip_t_x100"] == pytest.approx(100 * cell["clip_t"].mean())
    assert list(summary["label"].unique()) == [label("pretrained"), label("finetuned-text-aware")]
    assert format_summary(summary)["model"].iloc[0] == label("pretrained")
    table = seed_comparison(rows)
    assert table["CLIP-T (plain cosine)"].iloc[0] == f"{SEED_PROJECT_CLIP_T:.2f}" and len(table) == 2 + 2 * 2
    assert "empty text prompt" in table["prompts"].iloc[1] and "0.588" in table["caveat"].iloc[1]


def test_a_model_against_itself_differs_by_exactly_zero():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": 0.02}, noise=0.01)
    twin = [dict(r, model="copy") for r in rows if r["model"] == "finetuned-text-aware"]
    for metric in METRICS:
        assert paired_difference(rows + twin, "copy", "finetuned-text-aware", metric) == (0.0, 0.0, 0.0)
    g = matched_gain(rows + twin, "copy", "finetuned-text-aware")
    assert (g.gain, g.low, g.high) == (0.0, 0.0, 0.0) and g.half_width == 0.0


def test_a_planted_difference_is_found_and_pairing_narrows_the_interval():
    planted = 0.01
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": planted}, n_refs=20, noise=0.002)
    # the references differ a lot from each other: unpaired intervals would be wide
    spread = {f"ref{r}": 0.05 * np.sin(r) for r in range(20)}
    for row in rows:
        row["clip_t"] += spread[row["reference"]]
    mean, lo, hi = paired_difference(rows, "finetuned-text-aware", "pretrained", scale=0.5)
    assert mean == pytest.approx(planted, abs=0.002) and 0 < lo < planted < hi
    unpaired = [bootstrap_ci([r["clip_t"] for r in rows if r["model"] == m and r["scale"] == 0.5
                                    and r["prompt_kind"] == EDIT]) for m in ("finetuned-text-aware", "pretrained")]
    assert hi - lo < (unpaired[0][2] - unpaired[0][1]) / 3 and unpaired[0][1] < unpaired[1][2]  # unpaired: overlap
    g = matched_gain(rows, "finetuned-text-aware", "pretrained")
    assert g.gain == pytest.approx(planted, abs=0.002) and g.low > 0
    # no planted difference: the interval holds zero
    same = synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": 0.0}, n_refs=20, noise=0.002)
    _, lo0, hi0 = paired_difference(same, "finetuned-text-aware", "pretrained")
    assert lo0 < 0 < hi0
    # images without a partner are refused
    with pytest.raises(ValueError, match="no partner"):
        paired_difference(rows[:-1], "finetuned-text-aware", "pretrained", prompt_kind=None)


def test_headline_table_per_edit_category_against_every_baseline():
    rows = synthetic_rows({"pretrained": 0.0, "pretrained-instantstyle": 0.0, "finetuned-vanilla": 0.0,
                           "finetuned-text-aware": {"style": 0.04}}, n_refs=16)
    table, gains = headline_table(rows)
    assert list(table["comparison"].unique()) == [f"{label('finetuned-text-aware')} - {label(b)}" for b in
                                                  ("finetuned-vanilla", "pretrained-instantstyle", "pretrained")]
    assert list(table["edit prompts"][:5]) == ["all", *CATEGORIES]
    gain = table.set_index(["comparison", "edit prompts"])["CLIP-T gain at matched CLIP-I"]
    first = table["comparison"].iloc[0]
    assert gain[first, "style"] == pytest.approx(0.04, abs=1e-6) and gain[first, "setting"] == pytest.approx(0, abs=1e-6)
    assert gain[first, "all"] == pytest.approx(0.01, abs=1e-6)  # a quarter of the edits are style edits
    assert (table["scores"] == "plain cosine, CLIP tiny-clip").all() and (table["references"].iloc[1:5] == 4).all()
    g = gains[("pretrained", "style")]
    assert g.low > 0 and table["± resolvable"].iloc[4] == pytest.approx(round(g.half_width, 4))
