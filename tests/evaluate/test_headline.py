"""helpers.evaluate.headline: the headline is computed from the rows (overall and per edit category, against
every baseline) and says plainly when a comparison cannot be made."""
import pytest
from _rows import synthetic_rows

from helpers.evaluate.headline import headline, headline_table
from helpers.evaluate.stats import CATEGORIES, N_BOOT, matched_gain
from helpers.sample.registry import label


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


def test_each_masked_run_is_compared_with_its_unmasked_twin_when_both_were_evaluated(monkeypatch):
    """A masked run (fake rows) appears against its twin in the paired table, the headline table and the sentences,
    with the subject scores' paired differences; it is not one of the text-aware model's baselines. Without the
    masked run, none of it."""
    from helpers.evaluate.headline import paired_table, twin_of, twin_pairs
    from helpers.sample import registry

    base = {"finetuned-vanilla": 0.0, "finetuned-text-aware": 0.01}
    rows = synthetic_rows({**base, "finetuned-vanilla-mask-loss": 0.02}, subject=True)
    for r in rows:
        if r["model"] == "finetuned-vanilla-mask-loss":
            r["clip_i_background"] -= 0.05  # the masked run leaves the background to the prompt
    masked = ("finetuned-vanilla-mask-loss", "finetuned-vanilla")
    assert twin_pairs(rows) == [masked] and twin_of("finetuned-text-aware") is None
    head = f"{label(masked[0])} - {label(masked[1])}"
    paired = paired_table(rows)
    assert list(paired["comparison"].unique()) == [f"{label('finetuned-text-aware')} - {label('finetuned-vanilla')}",
                                                   head]
    twin_rows = paired[paired["comparison"] == head]
    assert len(twin_rows) == 4 and twin_rows["CLIP-I background difference"].str.startswith("-0.050").all()
    table, gains = headline_table(rows)
    assert (table["comparison"] == head).sum() == 5  # all edits and each category
    g = gains[(masked, None)]
    assert (g.model, g.baseline) == masked and g.gain == pytest.approx(0.02, abs=1e-9)
    text = headline(rows)
    assert f"Masked training: {label(masked[0])} against its unmasked twin {label(masked[1])}." in text
    assert f"{label(masked[0])} has a CLIP-T 0.020 higher than {label(masked[1])}" in text
    assert "CLIP-I background -0.050 [-0.050, -0.050]" in text
    assert f"higher than {label(masked[0])}" not in text and f"lower than {label(masked[0])}" not in text
    plain = synthetic_rows(base, subject=True)
    assert twin_pairs(plain) == [] and "Masked training" not in headline(plain)
    assert len(paired_table(plain)) == 4
    # the registry's pairing (helpers.sample.registry.masked_twins, where it has one) wins over the name
    monkeypatch.setattr(registry, "masked_twins", lambda: {"vanilla-masked": "finetuned-vanilla"}, raising=False)
    assert twin_of("vanilla-masked") == "finetuned-vanilla" and twin_pairs(
        [dict(r, model="vanilla-masked") if r["model"] == masked[0] else r for r in rows]) == [
        ("vanilla-masked", "finetuned-vanilla")]
