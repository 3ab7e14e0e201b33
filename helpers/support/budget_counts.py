"""The counted T4 budget (t4_budget.json) and what a T4 does with it: the fractions of its fp16 peak that
projections assume, with their sources, and the counted TFLOP, minutes, gradient all-reduce and memory of a
training step, a generated image, the feature cache and the segmenter.

    from helpers.support.budget_counts import TRAINING, training_minutes, training_peak_gib
    print(f"{training_minutes():.0f} min per text-aware run at {TRAINING.label()}")
    print(f"peak {training_peak_gib():.1f} GiB per training step")

The counts live in `t4_budget.json` beside this module (package data, so a pip install from git has it).
bench/t4_budget.py writes it: SD 1.5 + IP-Adapter Plus at their real sizes, built from their configs as fake
tensors (shapes and dtypes, no weights, no GPU), run through the project's real training step and the
sampling call of helpers.sample.generate, as a T4 runs them: frozen weights in fp16, trainable ones in
fp32, CUDA autocast's cast policy (emulated on the CPU and checked against CUDA's own autocast kernels),
SDPA as the memory-efficient kernel (a T4, sm75, has no flash attention); and the segmenter, CLIPSeg
(helpers.data.masks), from its published config, as load_segmenter runs it on a GPU. Memory is torch's MemTracker at the
second training step (AdamW's state exists then): what `torch.cuda.max_memory_allocated` would report; the
CUDA context (~0.3-0.5 GiB) and the allocator's slack come on top. FLOPs are torch's FlopCounterMode's
(matrix multiplies, convolutions, attention). The file's "how" says which torch, when, and what was emulated.

Minutes are projections, not measurements: counted FLOPs over a fraction of the T4's 65 TFLOPS fp16
tensor-core peak. Projections use the *expected* fractions, which published T4 speeds imply, sampling
(SAMPLING, 12%) and training (TRAINING, 8%) apart, each with its sources and range; CEILING (35%, what a
sustained fp16 matrix multiply reaches on a T4) gives the best case. Quote a figure with its efficiency.

N GPUs: a data-parallel training step pays a ring all-reduce of the gradients of the trainable parameters,
fp32, every step (`allreduce_seconds`: 206 MB for the text-aware adapter, about 0.05 s at the assumed
ALLREDUCE_GB_PER_S).

Each notebook's minutes, added up from these, are helpers.support.budget's (notebook_projection); a time
measured on a GPU beside them, helpers.support.budget_measured's. Reading it needs no torch: the file is JSON,
loaded once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

T4_FP16_TFLOPS = 65  # NVIDIA's datasheet: peak dense fp16 tensor-core rate of a Tesla T4
BUDGET_FILE = "t4_budget.json"


@dataclass(frozen=True)
class Efficiency:
    """A fraction of the T4's fp16 peak that projections assume: the figure used, the range the sources give."""

    kind: str  # "sampling", "training" or "ceiling"
    expected: float  # the fraction projections use
    low: float  # the published range
    high: float
    sources: tuple[str, ...]  # where the range comes from
    note: str = ""  # how the sources become the range

    def label(self) -> str:
        """"12% of the T4's 65 TFLOPS fp16 peak (sampling, expected; published T4 speeds: 9-16%)"."""
        if self.kind == "ceiling":
            return f"{efficiency_label(self.expected)} (the ceiling: a sustained fp16 GEMM reaches {self.high:.0%})"
        return (f"{efficiency_label(self.expected)} ({self.kind}, expected; published T4 speeds: "
                f"{100 * self.low:.0f}-{self.high:.0%})")


# Sampling: SD 1.5, 512 px, batch 1, fp16 on a T4, in denoising steps (it) per second. One guided step is two
# UNet passes: the file's unet_tflop_per_step / batch (1.62 TFLOP), so these speeds are 9-16% of the peak.
SAMPLING_SPEEDS = {
    "AUTOMATIC1111/stable-diffusion-webui issue 1078": (3.5, 5.5),  # without xformers, with
    "TheLastBen/fast-stable-diffusion issue 755": (5.0, 6.5),  # without, with xformers 0.14 (SDPA ~ the same)
}
SAMPLING = Efficiency(
    "sampling", 0.12, 0.09, 0.16,
    sources=("AUTOMATIC1111/stable-diffusion-webui issue 1078: 3.5 it/s without xformers, 5.5 it/s with",
             "TheLastBen/fast-stable-diffusion issue 755: about 5 it/s without xformers, 6.5 it/s with "
             "(issue 2615: SDPA about the same as xformers)"),
    note="SD 1.5 at 512 px, batch 1, fp16; one guided step is 1.62 TFLOP counted (SAMPLING_SPEEDS)")
TRAINING = Efficiency(
    "training", 0.08, 0.05, 0.10,
    sources=("TheLastBen/fast-stable-diffusion issue 2330: DreamBooth fine-tuning of the full UNet at 640 px, "
             "0.85 it/s on a T4",),
    note="roughly 5-10% of the peak for fine-tuning SD 1.5 on a T4; 8% expected")
CEILING = Efficiency(
    "ceiling", 0.35, 0.35, 0.37,
    sources=("NVIDIA developer forum, 'About GPU peak performance': a sustained fp16 cuBLAS 4096^3 GEMM on a T4 "
             "reaches about 24 TFLOPS (37%), as the card caps itself at 70 W",),
    note="no real workload beats a large GEMM: the best case")
# the fractions every projection is quoted at: expected training, expected sampling, the ceiling
EFFICIENCIES = (TRAINING.expected, SAMPLING.expected, CEILING.expected)

# Counted as the file's figures are (FlopCounterMode, SD 1.5's VAE config at 512 px, fp16): the feature cache's
# VAE encode of one image (tests/support/test_budget_counts.py recounts it). The file counts sampling's decode (2.515).
VAE_ENCODE_TFLOP = 1.117


@lru_cache(maxsize=1)
def t4_budget() -> dict:
    """The counted budget (t4_budget.json), loaded once. Keys: "how" (what was counted, how, with which torch,
    when), "settings" (the full profile's defaults it was counted at), "training" ({variant: {"plain",
    "checkpointing"}: peak_gib, parts_gib, tflop}), "sampling" (per image, per reference, memory),
    "projections" (helpers.support.budget.projections(): minutes at the expected efficiencies and at the ceiling),
    "emulation_check"."""
    return json.loads(resources.files(__package__).joinpath(BUDGET_FILE).read_text())


def efficiency_label(efficiency: float) -> str:
    """"12% of the T4's 65 TFLOPS fp16 peak": the words to put beside a projected figure."""
    return f"{efficiency:.0%} of the T4's {T4_FP16_TFLOPS} TFLOPS fp16 peak"


def minutes(tflop: float, efficiency: float) -> float:
    """Minutes a T4 takes for `tflop` TFLOP when it sustains `efficiency` of its fp16 peak."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency {efficiency!r}: a fraction of the peak, above 0 and at most 1 (e.g. 0.12)")
    return tflop / (efficiency * T4_FP16_TFLOPS) / 60


def training_tflop_per_step(variant: str = "text_aware", *, checkpointing: bool = False, batch_size: int | None = None,
                            budget: dict | None = None) -> float:
    """Counted TFLOP of one training step (forward, backward, AdamW) at the profile's batch and resolution,
    or scaled to `batch_size` (the step's work grows with its batch); with gradient checkpointing the forward
    runs twice."""
    budget = budget or t4_budget()
    scale = 1.0 if batch_size is None else batch_size / budget["settings"]["train_batch_size"]
    return scale * _training(variant, checkpointing, budget)["tflop"]


# --------------------------------------------------------------------------------------------------
# N GPUs: the gradient all-reduce of data-parallel training
# --------------------------------------------------------------------------------------------------

# A ring all-reduce of B bytes over N GPUs moves 2(N-1)/N x B through each GPU's link (nccl-tests' "bus
# bandwidth" counts it so). A T4 sits on PCIe Gen3 x16: 32 GB/s both directions together, 16 GB/s each way
# (NVIDIA T4 datasheet, "interconnect bandwidth"); Kaggle's two T4s have no NVLink, and a cloud VM may route
# the traffic through host memory. Assumed: 4 GB/s of all-reduce bus bandwidth, a quarter of one direction's
# peak. An assumption on the slow side, not a measurement. DDP overlaps the all-reduce with the backward
# pass; it is added on top here.
ALLREDUCE_GB_PER_S = 4.0
ALLREDUCE_SOURCE = ("assumed 4 GB/s of all-reduce bandwidth between the GPUs: a quarter of PCIe Gen3 x16's 16 GB/s "
                    "each way (NVIDIA T4 datasheet: 32 GB/s interconnect), as no NVLink joins Kaggle's two T4s")
GRADIENT_BYTES_PER_PARAMETER = 4  # the trainable parameters and their gradients are fp32 (helpers.train.run)


def gradient_mb(variant: str = "text_aware", *, budget: dict | None = None) -> float:
    """MB (10^6 bytes) of one step's gradients that data-parallel training all-reduces: the counted trainable
    parameters (t4_budget()["training"][variant]["plain"]["trainable_parameters"]) x 4 bytes (fp32)."""
    n = _training(variant, False, budget)["trainable_parameters"]
    return n * GRADIENT_BYTES_PER_PARAMETER / 1e6


def allreduce_seconds(variant: str = "text_aware", gpus: int = 2, *, budget: dict | None = None,
                      gb_per_s: float = ALLREDUCE_GB_PER_S) -> float:
    """Seconds one training step spends all-reducing its gradients over `gpus` GPUs (0 on one): a ring
    all-reduce, 2 (N-1)/N x gradient_mb through each link at `gb_per_s` (ALLREDUCE_GB_PER_S, assumed)."""
    if gpus < 1:
        raise ValueError(f"gpus {gpus!r}: at least 1")
    return 2 * (gpus - 1) / gpus * gradient_mb(variant, budget=budget) * 1e6 / (gb_per_s * 1e9)


def _training(variant: str, checkpointing: bool, budget: dict | None) -> dict:
    runs = (budget or t4_budget())["training"]
    if variant not in runs:
        raise KeyError(f"variant {variant!r}: counted are {', '.join(runs)}")
    return runs[variant]["checkpointing" if checkpointing else "plain"]


def training_minutes(variant: str = "text_aware", steps: int | None = None, efficiency: float | None = None, *,
                     checkpointing: bool = False, gpus: int = 1, budget: dict | None = None) -> float:
    """Projected T4 minutes of `steps` training steps (default: the full profile's run, 6 epochs over the
    training split) of `variant` at `efficiency` of the T4's peak (default: TRAINING's expected 8%). On
    `gpus` T4s, the same steps of the same global batch: each GPU does 1/gpus of the FLOPs, then every step
    pays the gradient all-reduce (allreduce_seconds)."""
    budget = budget or t4_budget()
    steps = budget["settings"]["steps_per_variant"] if steps is None else steps
    efficiency = TRAINING.expected if efficiency is None else efficiency
    compute = minutes(steps * training_tflop_per_step(variant, checkpointing=checkpointing, budget=budget), efficiency)
    return compute / gpus + steps * allreduce_seconds(variant, gpus, budget=budget) / 60


def image_tflop(steps: int | None = None, *, budget: dict | None = None) -> float:
    """Counted TFLOP of one generated image at `steps` denoising steps (default: the profile's 30): the guided
    UNet steps at the evaluation's batch plus the VAE decode."""
    s = (budget or t4_budget())["sampling"]
    extra = 0 if steps is None else steps - s["steps"]
    return s["tflop_per_image"] + extra * s["unet_tflop_per_step"] / s["batch"]


def segmenter_tflop(images: int = 1, *, budget: dict | None = None) -> float:
    """Counted TFLOP of the segmenter (CLIPSeg, helpers.data.masks) on `images` images, one prompt each:
    t4_budget()["segmenter"]["tflop_per_image"] each."""
    return images * (budget or t4_budget())["segmenter"]["tflop_per_image"]


def feature_cache_tflop(images: int = 1, *, budget: dict | None = None) -> float:
    """Counted TFLOP of the feature cache (notebook 01) on `images` training images: the VAE encode
    (VAE_ENCODE_TFLOP) and one image-encoder pass each (the file's figure per reference is two passes, a
    reference and a zero image). The text encoder, under 1% of it, is left out, as in notebook 01's projection."""
    s = (budget or t4_budget())["sampling"]
    return images * (VAE_ENCODE_TFLOP + s["image_encoder_tflop_per_reference"] / 2)


def images_minutes(n_images: int, efficiency: float | None = None, *, references: int = 0, steps: int | None = None,
                   segmented: bool = False, budget: dict | None = None) -> float:
    """Projected T4 minutes to generate `n_images` at the profile's sampling settings (`steps` denoising steps,
    default 30, with guidance: image_tflop), plus the image encoder once for each of `references` reference
    images, and with `segmented` the segmenter on each image (notebook 05's subject scores), at `efficiency` of
    the peak (default: SAMPLING's expected 12%). Scoring (CLIP, DINO) is not counted: under 1% of it."""
    s = (budget or t4_budget())["sampling"]
    efficiency = SAMPLING.expected if efficiency is None else efficiency
    tflop = n_images * image_tflop(steps, budget=budget) + references * s["image_encoder_tflop_per_reference"]
    if segmented:
        tflop += segmenter_tflop(n_images, budget=budget)
    return minutes(tflop, efficiency)


def seconds_per_image(efficiency: float | None = None, *, steps: int | None = None, segmented: bool = False,
                      budget: dict | None = None) -> float:
    """Projected T4 seconds per generated image (images_minutes of one image, in seconds); with `segmented`,
    and its segmentation (a grid image of notebook 05)."""
    return 60 * images_minutes(1, efficiency, steps=steps, segmented=segmented, budget=budget)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def training_peak_gib(variant: str = "text_aware", *, checkpointing: bool = False, budget: dict | None = None) -> float:
    """Counted peak GiB of a training step (parts in t4_budget()["training"][variant][...]["parts_gib"])."""
    return _training(variant, checkpointing, budget)["peak_gib"]


def sampling_memory(resolution: int = 512, guidance: float = 7.5, *, budget: dict | None = None) -> tuple[float, float]:
    """(GiB per image in a pipeline call, GiB a call needs besides), on top of the loaded models, counted at
    the profile's 512 px with guidance and scaled by pixels (and halved per image without guidance, which
    halves the UNet's batch). The per-image part is the denoising UNet's; the rest is the VAE decode of one
    image (generate decodes one at a time)."""
    s = (budget or t4_budget())["sampling"]
    area = (resolution / s.get("resolution", 512)) ** 2
    return s["gib_per_image"] * area * (1.0 if guidance > 1 else 0.5), s["call_overhead_gib"] * area


def fits_batch(free_gib: float, resolution: int = 512, guidance: float = 7.5, *, margin: float = 0.7,
               most: int = 8, budget: dict | None = None) -> int:
    """Images per pipeline call that fit `margin` of `free_gib` (what the GPU has free with the models loaded),
    from the counted sampling memory; at least 1, at most `most`."""
    per_image, overhead = sampling_memory(resolution, guidance, budget=budget)
    return int(max(1, min(most, math.floor((margin * free_gib - overhead) / per_image))))
