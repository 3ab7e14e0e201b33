"""helpers.support.budget_measured: a time measured on a GPU as the fraction of the peak it implies, beside the
projection (the lines notebooks 03 and 05 and bench/gpu_check.py print)."""

import pytest

from helpers.support import budget
from helpers.support import budget_counts as counts
from helpers.support import budget_measured as measured


def test_a_measured_time_gives_the_fraction_of_the_peak_it_implies():
    b = counts.t4_budget()
    at_expected = 60 * counts.training_minutes("text_aware", 1)  # seconds of one step at 8% of the peak
    assert measured.training_step_efficiency(at_expected) == pytest.approx(0.08)
    assert measured.training_step_efficiency(at_expected, batch_size=8) == pytest.approx(0.16)  # twice the work
    assert measured.image_efficiency(counts.seconds_per_image()) == pytest.approx(0.12)
    assert measured.image_efficiency(counts.seconds_per_image(steps=15), steps=15) == pytest.approx(0.12)
    assert measured.implied_efficiency(2.0, 13.0) == pytest.approx(0.1)
    assert measured.implied_efficiency(2.0, 13.0, peak_tflops=130) == pytest.approx(0.05)
    text = measured.training_speed_line(2 * at_expected)
    assert text.startswith(f"measured {2 * at_expected:.2f} s per training step: 4.0% of the T4's 65 TFLOPS")
    assert f"{at_expected:.2f} s at the 8% expected" in text
    tflop = b["sampling"]["tflop_per_image"]
    assert f"({tflop:.2f} TFLOP counted)" in measured.sampling_speed_line(5.0)
    assert "of this GPU's 312 TFLOPS fp16 peak" in measured.sampling_speed_line(1.0, peak_tflops=312)
    with pytest.raises(ValueError, match="above 0"):
        measured.image_efficiency(0.0)


def test_the_feature_cache_and_the_segmenter_measured_sit_beside_notebook_01s_projection():
    """bench/gpu_check.py's lines for the cache and CLIPSeg: at the seconds notebook 01 projects per image (and
    per call of the counted batch), 12% of the peak; the cache's FLOPs are those 01's projection adds up."""
    b = counts.t4_budget()
    st, batch = b["settings"], b["segmenter"]["batch"]
    cache_parts = dict(budget.notebook_projection("01").parts)
    cache_minutes = next(m for what, m in cache_parts.items() if what.startswith("feature cache"))
    assert counts.minutes(counts.feature_cache_tflop(st["train_images"]), 0.12) == pytest.approx(cache_minutes)
    per_image = 60 * cache_minutes / st["train_images"]
    assert measured.implied_efficiency(per_image, counts.feature_cache_tflop()) == pytest.approx(0.12)
    text = measured.feature_cache_speed_line(2 * per_image)
    assert text.startswith(f"measured {2 * per_image:.2f} s per cached image: 6.0% of the T4's 65 TFLOPS")
    assert f"{per_image:.2f} s at the 12% expected" in text
    assert measured.feature_cache_speed_line(16 * per_image, 16).startswith(
        f"measured {16 * per_image:.2f} s per 16 cached images: 12.0% of the T4's")
    per_call = 60 * counts.minutes(counts.segmenter_tflop(batch), 0.12)
    text = measured.segmenter_speed_line(per_call)
    assert text.startswith(f"measured {per_call:.2f} s per segmenter call of {batch} images: 12.0% of the T4's")
    assert f"({counts.segmenter_tflop(batch):.2f} TFLOP counted)" in text
    assert "segmenter call of 1 image: 1.5%" in measured.segmenter_speed_line(per_call, 1)  # 1/8 of the work
