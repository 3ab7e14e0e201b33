"""helpers.evaluate.stats: intervals resample references, differences between models are paired, the tables add
up."""
import numpy as np
import pandas as pd
import pytest
from _rows import synthetic_rows

from helpers.evaluate.plots import SEED_PROJECT_CLIP_T, seed_comparison
from helpers.evaluate.stats import (
    EDIT,
    METRICS,
    bootstrap_ci,
    format_summary,
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


