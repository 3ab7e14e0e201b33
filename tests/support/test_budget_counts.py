"""helpers.support.budget_counts reads the counted T4 budget (helpers/support/t4_budget.json): the fractions of
the T4's peak assumed, with their sources, and the counted TFLOP, minutes and memory (bench/t4_budget.py counts
the file; tests/support/test_budget.py runs it at the tiny profile's shapes)."""

import sys
from pathlib import Path

import pytest

from helpers.support import budget_counts as counts

ROOT = Path(__file__).parents[2]


def test_the_packaged_budget_is_read_once_and_says_how_it_was_counted():
    b = counts.t4_budget()
    assert counts.t4_budget() is b
    assert {"how", "settings", "training", "sampling", "segmenter", "projections", "emulation_check"} <= set(b)
    assert b["how"]["torch"] and b["how"]["date"] and b["how"]["emulated"]
    assert b["emulation_check"]["ops"] > 1000 and b["emulation_check"]["mismatches"] == []
    for variant in ("vanilla", "text_aware"):
        for kind in ("plain", "checkpointing"):
            c = b["training"][variant][kind]
            assert sum(c["parts_gib"].values()) == pytest.approx(c["peak_gib"], rel=2e-3)
    assert counts.training_peak_gib("text_aware") <= b["settings"]["memory_limit_gib"]
    assert counts.training_peak_gib("text_aware", checkpointing=True) < counts.training_peak_gib("text_aware")


def test_minutes_are_the_counted_flops_over_the_named_fraction_of_the_t4s_peak():
    b = counts.t4_budget()
    tflop, steps = b["training"]["text_aware"]["plain"]["tflop"], b["settings"]["steps_per_variant"]
    assert counts.training_minutes("text_aware", efficiency=0.25) == pytest.approx(steps * tflop / (0.25 * 65 * 60))
    assert counts.training_minutes("text_aware", 10, 0.5) == pytest.approx(10 * tflop / (0.5 * 65 * 60))
    s = b["sampling"]
    assert counts.images_minutes(100, 0.12, references=5) == pytest.approx(
        (100 * s["tflop_per_image"] + 5 * s["image_encoder_tflop_per_reference"]) / (0.12 * 65 * 60))
    # fewer denoising steps: fewer guided UNet steps, the same decode
    assert counts.image_tflop(30) == s["tflop_per_image"]
    assert counts.image_tflop(20) == pytest.approx(s["tflop_per_image"] - 10 * s["unet_tflop_per_step"] / s["batch"])
    assert counts.efficiency_label(0.12) == "12% of the T4's 65 TFLOPS fp16 peak"
    with pytest.raises(ValueError, match="fraction"):
        counts.minutes(1.0, 25)
    with pytest.raises(KeyError, match="counted are"):
        counts.training_minutes("no_such_variant")


def test_projections_use_the_expected_efficiencies_the_published_t4_speeds_give():
    """Sampling 12% and training 8% by default, each inside the range its sources give; 35% the ceiling."""
    b = counts.t4_budget()
    s = b["sampling"]
    step = s["unet_tflop_per_step"] / s["batch"]  # one guided denoising step of one image (two UNet passes)
    speeds = [v for pair in counts.SAMPLING_SPEEDS.values() for v in pair]  # it/s, SD 1.5 at 512 px on a T4
    assert counts.SAMPLING.low == round(min(speeds) * step / 65, 2) == 0.09
    assert counts.SAMPLING.high == round(max(speeds) * step / 65, 2) == 0.16
    for e in (counts.SAMPLING, counts.TRAINING, counts.CEILING):
        assert e.low <= e.expected <= e.high and e.sources and all("issue" in x or "forum" in x for x in e.sources)
    assert (counts.SAMPLING.expected, counts.TRAINING.expected, counts.CEILING.expected) == (0.12, 0.08, 0.35)
    assert set(counts.SAMPLING_SPEEDS) <= {x.split(":")[0] for x in counts.SAMPLING.sources}
    assert counts.training_minutes() == pytest.approx(counts.training_minutes(efficiency=0.08))
    assert counts.images_minutes(10) == pytest.approx(counts.images_minutes(10, 0.12))
    assert counts.seconds_per_image() == pytest.approx(s["tflop_per_image"] / (0.12 * 65))
    assert "12% of the T4's 65 TFLOPS fp16 peak (sampling, expected; published T4 speeds: 9-16%)" == \
        counts.SAMPLING.label()


def test_the_feature_caches_vae_encode_is_counted_as_the_file_counts_its_decode():
    """VAE_ENCODE_TFLOP recounted: FlopCounterMode on SD 1.5's VAE (meta tensors, fp16, 512 px); the same count of
    the decode gives the file's decode_tflop_per_image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train import real_size_vae_and_text

    from helpers.tiny.shapes import no_init

    with torch.device("meta"), no_init():
        vae = real_size_vae_and_text(0)[0].half()
    counted = []
    for run in (lambda: vae.encode(torch.empty(1, 3, 512, 512, dtype=torch.half, device="meta")),
                lambda: vae.decode(torch.empty(1, 4, 64, 64, dtype=torch.half, device="meta"))):
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            run()
        counted.append(flops.get_total_flops() / 1e12)
    assert counted[0] == pytest.approx(counts.VAE_ENCODE_TFLOP, rel=1e-3)
    assert counted[1] == pytest.approx(counts.t4_budget()["sampling"]["decode_tflop_per_image"], rel=2e-3)


def test_batch_sizes_fit_the_counted_sampling_memory():
    per_image, overhead = counts.sampling_memory()
    assert 0 < per_image < 1 and 0 < overhead < 2  # GiB
    assert counts.fits_batch((overhead + 3 * per_image) / 0.7 * 1.0001) == 3
    assert counts.fits_batch((overhead + 3 * per_image) / 0.7 * 0.9999) == 2
    assert counts.fits_batch(0.0) == 1 and counts.fits_batch(1000.0) == 8 and counts.fits_batch(1000.0, most=5) == 5
    assert counts.sampling_memory(256)[0] == pytest.approx(per_image / 4)  # pixels
    assert counts.sampling_memory(guidance=1.0)[0] == pytest.approx(per_image / 2)  # half the UNet's batch
