"""A time measured on a GPU beside the counted budget's projection: the fraction of the fp16 peak it implies.

    from helpers.support.budget_measured import training_speed_line
    print(training_speed_line(1.4, "text_aware"))   # measured 1.40 s per training step: ...% of the T4's ...

The counted TFLOP of the work (helpers.support.budget_counts: a training step, a generated image, the feature
cache, a CLIPSeg call) over the measured seconds and the card's fp16 peak (the T4's 65 TFLOPS unless
`peak_tflops` names another) is the fraction of the peak it implies; each *_speed_line puts it beside the
seconds a T4 is projected to take at the expected fraction and at the ceiling. Notebooks 03 and 05 and
bench/gpu_check.py print these lines. Reading it needs no torch.
"""

from __future__ import annotations

from .budget_counts import (CEILING, SAMPLING, T4_FP16_TFLOPS, TRAINING, Efficiency, allreduce_seconds,
                            feature_cache_tflop, image_tflop, minutes, segmenter_tflop, t4_budget,
                            training_tflop_per_step)


def implied_efficiency(seconds: float, tflop: float, *, peak_tflops: float = T4_FP16_TFLOPS) -> float:
    """The fraction of `peak_tflops` that doing `tflop` TFLOP in `seconds` implies (0.12: 12% of the peak)."""
    if not seconds > 0:
        raise ValueError(f"seconds {seconds!r}: a measured time above 0")
    return tflop / seconds / peak_tflops


def training_step_efficiency(seconds_per_step: float, variant: str = "text_aware", *, batch_size: int | None = None,
                             checkpointing: bool = False, peak_tflops: float = T4_FP16_TFLOPS,
                             budget: dict | None = None) -> float:
    """The fraction of the peak one training step of `seconds_per_step` implies: the counted TFLOP of a step
    (at the profile's resolution; scaled to `batch_size` when given) over the time."""
    tflop = training_tflop_per_step(variant, checkpointing=checkpointing, batch_size=batch_size, budget=budget)
    return implied_efficiency(seconds_per_step, tflop, peak_tflops=peak_tflops)


def image_efficiency(seconds_per_image: float, *, steps: int | None = None, peak_tflops: float = T4_FP16_TFLOPS,
                     budget: dict | None = None) -> float:
    """The fraction of the peak that generating one image in `seconds_per_image` implies (image_tflop at
    `steps` denoising steps, default the profile's 30, at the profile's resolution)."""
    return implied_efficiency(seconds_per_image, image_tflop(steps, budget=budget), peak_tflops=peak_tflops)


def _speed_line(what: str, seconds: float, tflop: float, expected: Efficiency, peak_tflops: float, *,
                gpus: int = 1, extra_seconds: float = 0.0) -> str:
    fraction = implied_efficiency(seconds, tflop, peak_tflops=peak_tflops)
    peak = (f"{fraction:.1%} of the T4's {T4_FP16_TFLOPS} TFLOPS fp16 peak" if peak_tflops == T4_FP16_TFLOPS
            else f"{fraction:.1%} of this GPU's {peak_tflops:g} TFLOPS fp16 peak")
    projected = ", ".join(f"{60 * minutes(tflop, e.expected) + extra_seconds:.2f} s at the {e.expected:.0%} "
                          f"{'ceiling' if e is CEILING else 'expected'}" for e in (expected, CEILING))
    where = "a T4" if gpus == 1 else f"{gpus}xT4 (with {extra_seconds:.2f} s of gradient all-reduce)"
    per_gpu = "" if gpus == 1 else " per GPU"
    return (f"measured {seconds:.2f} s per {what}: {peak}{per_gpu} ({tflop:.2f} TFLOP counted{per_gpu}); on {where}, "
            f"projected {projected}")


def training_speed_line(seconds_per_step: float, variant: str = "text_aware", *, batch_size: int | None = None,
                        checkpointing: bool = False, gpus: int = 1, peak_tflops: float = T4_FP16_TFLOPS,
                        budget: dict | None = None) -> str:
    """A measured second per training step beside the projection, with the fraction of the peak it implies:
    "measured 1.40 s per training step: 8% of the T4's 65 TFLOPS fp16 peak (6.94 TFLOP counted); on a T4,
    projected 1.33 s at the 8% expected, 0.31 s at the 35% ceiling". On `gpus` GPUs, `batch_size` is the
    batch of one GPU (per process): the FLOPs are one GPU's, and the projection adds the all-reduce."""
    tflop = training_tflop_per_step(variant, checkpointing=checkpointing, batch_size=batch_size, budget=budget)
    return _speed_line("training step", seconds_per_step, tflop, TRAINING, peak_tflops, gpus=gpus,
                       extra_seconds=allreduce_seconds(variant, gpus, budget=budget))


def sampling_speed_line(seconds_per_image: float, *, steps: int | None = None, peak_tflops: float = T4_FP16_TFLOPS,
                        budget: dict | None = None) -> str:
    """A measured second per generated image beside the projection, with the fraction of the peak it implies."""
    return _speed_line("image", seconds_per_image, image_tflop(steps, budget=budget), SAMPLING, peak_tflops)


def feature_cache_speed_line(seconds: float, images: int = 1, *, peak_tflops: float = T4_FP16_TFLOPS,
                             budget: dict | None = None) -> str:
    """Measured seconds for `images` cached images (notebook 01's feature cache; a batch reads better than one
    image's hundredths of a second) beside the projection, with the fraction of the peak it implies (at
    SAMPLING's efficiencies, as notebook 01's projection has it)."""
    what = f"{images} cached images" if images != 1 else "cached image"
    return _speed_line(what, seconds, feature_cache_tflop(images, budget=budget), SAMPLING, peak_tflops)


def segmenter_speed_line(seconds_per_call: float, images: int | None = None, *, peak_tflops: float = T4_FP16_TFLOPS,
                         budget: dict | None = None) -> str:
    """A measured second per CLIPSeg call of `images` (image, prompt) pairs (default: the counted call's batch,
    t4_budget()["segmenter"]["batch"]) beside the projection, with the fraction of the peak it implies (at
    SAMPLING's efficiencies, as notebooks 01 and 05 project the segmenter)."""
    images = images or (budget or t4_budget())["segmenter"]["batch"]
    what = f"segmenter call of {images} image{'s' * (images != 1)}"
    return _speed_line(what, seconds_per_call, segmenter_tflop(images, budget=budget), SAMPLING, peak_tflops)
