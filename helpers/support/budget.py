"""What the full profile costs on a free Colab T4, counted: the figures the notebooks and the README quote.

    from helpers.support.budget import notebook_projection, series_minutes
    print(notebook_projection("03").line())   # notebook 03's defaults on a T4, with the assumption
    print(f"{series_minutes():.0f} min for the whole series")

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

The segmenter's work is counted where it runs: notebook 01 masks every row (train and test) once, notebook
05 segments every generated image of its grid for the subject scores, and a masked reference in notebook 03
(`mask="reference"` or `"both"`) costs one more image-encoder pass over the training images with their
background filled; the masked loss weights an elementwise MSE, nothing a FLOP count sees.

Minutes are projections, not measurements: counted FLOPs over a fraction of the T4's 65 TFLOPS fp16
tensor-core peak. Projections use the *expected* fractions, which published T4 speeds imply, sampling
(SAMPLING, 12%) and training (TRAINING, 8%) apart, each with its sources and range; CEILING (35%, what a
sustained fp16 matrix multiply reaches on a T4) gives the best case. Quote a figure with its efficiency.
Where a GPU is present, `training_speed_line` / `sampling_speed_line` turn a measured time into the fraction
of the peak it implies, beside the projection.

N GPUs (Kaggle's free T4 x2): every projection also gives the time on 2xT4 (`notebook_projection(name,
gpus=N)`; `Projection.line()` says both). Training keeps its global batch over the GPUs, so each does 1/N of a
step's FLOPs at the same fraction of its peak, and then pays a ring all-reduce of the gradients of the
trainable parameters, fp32, every step (`allreduce_seconds`: 206 MB for the text-aware adapter, about 0.05 s
at the assumed ALLREDUCE_GB_PER_S). 05's grid splits by job with nothing to exchange: time / N (notebook 05
launches it on every GPU, helpers.evaluate.launch). What a notebook does in its own process stays on one GPU:
02, 04, 03's samples, and 01, whose feature cache (about 1.5 min of a T4) would split under a launch too, but
a second process would spend about as long loading its models as it saved.

Reading it needs no torch: the file is JSON, loaded once.
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
# VAE encode of one image (tests/support/test_budget.py recounts it). The file counts sampling's decode (2.515).
VAE_ENCODE_TFLOP = 1.117

# notebook 03's MASK (helpers.train: "none", the default, "reference", "loss", "both"); those with a masked
# reference encode the training images again with their background filled (one image-encoder pass)
MASKS = ("none", "reference", "loss", "both")
MASKED_REFERENCE = ("reference", "both")

# The limits the defaults are sized to (issue 26): one free Colab sitting for the whole series, 45 minutes for
# each of the two long notebooks. tests/support/test_budget.py checks the defaults against them.
LIMIT_MINUTES = {"03": 45, "05": 45, "series": 90}
NOTEBOOKS = ("01", "02", "03", "04", "05")

# What the notebooks generate besides their main work, at the full profile's defaults (every image at the
# profile's sampling settings); tests/support/test_budget.py checks them against the helpers the cells call.
NOTEBOOK_02_IMAGES = 11  # section 7: both models (2); 8: the block recorded (1); 9: 2 rows x 3 scales (6); 10: 2
PREVIEW_IMAGES_PER_MODEL = 1  # 03's look at the trained models: 1 reference x 1 gallery prompt, each model
CARD_GRID_IMAGES = 2 * 2 * 2  # 03's model card (helpers.share.hub.sample_grid): 2 references x 2 prompts x 2 models
SAMPLE_REFERENCES, GALLERY_PROMPTS, SWEEP_SCALES = 3, 4, 4  # 04: profile.sample_references, its prompts, its sweep
BACKGROUND_IMAGES = 2 * 2  # 04's mask cell: the pretrained and the text-aware model, background kept and removed
TIMING_IMAGES = 2  # 05's warm-up and timed image before the grid


@lru_cache(maxsize=1)
def t4_budget() -> dict:
    """The counted budget (t4_budget.json), loaded once. Keys: "how" (what was counted, how, with which torch,
    when), "settings" (the full profile's defaults it was counted at), "training" ({variant: {"plain",
    "checkpointing"}: peak_gib, parts_gib, tflop}), "sampling" (per image, per reference, memory),
    "projections" (`projections()`: minutes at the expected efficiencies and at the ceiling), "emulation_check"."""
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


def grid_minutes(efficiency: float | None = None, *, budget: dict | None = None) -> float:
    """Projected T4 minutes of notebook 05's default grid (settings["grid_images"] images over
    settings["grid_references"] references, each image segmented for the subject scores), at SAMPLING's
    expected efficiency unless given."""
    budget = budget or t4_budget()
    return images_minutes(budget["settings"]["grid_images"], efficiency,
                          references=budget["settings"]["grid_references"], segmented=True, budget=budget)


def masked_reference_tflop(images: int | None = None, *, budget: dict | None = None) -> float:
    """Counted TFLOP of a masked reference's features (notebook 03, mask "reference" or "both"): the training
    images (default settings["train_images"]), background filled from 01's stored masks, through the image
    encoder once (the file's figure is two passes, a reference and a zero image). The target latents are the
    unmasked images' and stay as cached."""
    budget = budget or t4_budget()
    n = budget["settings"]["train_images"] if images is None else images
    return n * budget["sampling"]["image_encoder_tflop_per_reference"] / 2


def masked_reference_minutes(efficiency: float | None = None, *, images: int | None = None,
                             budget: dict | None = None) -> float:
    """Projected T4 minutes a masked reference adds to notebook 03 (masked_reference_tflop), once for all its
    runs, at SAMPLING's expected efficiency unless given. The masked loss adds nothing a FLOP count sees."""
    efficiency = SAMPLING.expected if efficiency is None else efficiency
    return minutes(masked_reference_tflop(images, budget=budget), efficiency)


# --------------------------------------------------------------------------------------------------
# Each notebook's projected minutes
# --------------------------------------------------------------------------------------------------


def notebook_03_runs(neighbour: bool = False) -> list[str]:
    """The variants notebook 03 trains, one run each: vanilla and text-aware, and with `neighbour` the
    text-aware model with neighbour pairing as well (helpers.profile.Profile.train_neighbour)."""
    return ["vanilla", "text_aware"] + (["text_aware"] if neighbour else [])


@dataclass(frozen=True)
class Projection:
    """A notebook's projected minutes on `gpus` T4s: at the expected efficiencies, at the ceiling, and what
    runs; with the expected minutes on one T4 and on two beside them."""

    notebook: str  # "01" .. "05", or "series"
    minutes: float  # at TRAINING's and SAMPLING's expected fractions of the peak, on `gpus` T4s
    best: float  # at CEILING
    parts: tuple[tuple[str, float], ...]  # (what runs, its expected minutes)
    assumption: str
    gpus: int = 1
    on: tuple[tuple[int, float], ...] = ()  # (T4s, expected minutes) for 1, 2 and `gpus`
    spread: str = ""  # how the work spreads over several GPUs, in words

    def minutes_on(self, gpus: int) -> float:
        """The expected minutes on `gpus` T4s (1 and 2 always; others as projected)."""
        return dict(self.on)[gpus]

    def line(self) -> str:
        """"Notebook 03 on a T4: about 33 min (...); 8 min at best. On 2xT4 (Kaggle): about 17 min (...).
        <assumption>" (on 2xT4, the one-T4 figure comes second)."""
        what = "; ".join(f"{w}: {_m(m)} min" for w, m in self.parts)
        name = "The whole series" if self.notebook == "series" else f"Notebook {self.notebook}"
        where = "a T4" if self.gpus == 1 else f"{self.gpus}xT4"
        other = (f"On 2xT4 (Kaggle's T4 x2): about {_m(self.minutes_on(2))} min ({self.spread})." if self.gpus == 1
                 else f"On one T4: about {_m(self.minutes_on(1))} min.")
        return (f"{name} on {where}: about {_m(self.minutes)} min ({what}); {_m(self.best)} min at best. {other} "
                f"{self.assumption}")


def _m(minutes_: float) -> str:
    return f"{minutes_:.0f}" if minutes_ >= 10 else f"{minutes_:.1f}"


def assumption(budget: dict | None = None) -> str:
    """The words every projection comes with: what was counted, at which efficiencies, what is left out."""
    st = (budget or t4_budget())["settings"]
    return (f"Counted FLOPs (helpers/support/t4_budget.json, the {st['profile']} profile's defaults at "
            f"{st['resolution']} px, {st['inference_steps']} sampling steps) over the expected "
            f"{TRAINING.expected:.0%} (training) and {SAMPLING.expected:.0%} (sampling) of the T4's "
            f"{T4_FP16_TFLOPS} TFLOPS fp16 peak, what published T4 speeds imply; at best {CEILING.expected:.0%}. "
            "GPU work only: downloads, model loading and scoring come on top.")


@dataclass(frozen=True)
class _Part:
    """One part of a notebook's GPU work: its counted TFLOP at an efficiency kind, whether it splits over
    several GPUs, and the gradient bytes it all-reduces (training: steps x gradient bytes, over its runs)."""

    what: str
    tflop: float
    kind: str  # "training" or "sampling"
    splits: str = ""  # what splits over several GPUs, in a word or two; "": it stays on one GPU
    reduced_mb: float = 0.0

    def allreduce_minutes(self, gpus: int) -> float:
        return 2 * (gpus - 1) / gpus * self.reduced_mb * 1e6 / (ALLREDUCE_GB_PER_S * 1e9) / 60

    def minutes(self, efficiency: float, gpus: int) -> float:
        return minutes(self.tflop, efficiency) / (gpus if self.splits else 1) + self.allreduce_minutes(gpus)


def _notebook_parts(name: str, *, neighbour: bool, steps: int | None, grid_images: int | None,
                    references: int | None, inference_steps: int | None, checkpointing: bool, mask: str,
                    budget: dict) -> list[_Part]:
    """Each part of notebook `name`'s GPU work (_Part)."""
    st, s = budget["settings"], budget["sampling"]
    if mask not in MASKS:
        raise ValueError(f"mask {mask!r}: choose one of {', '.join(MASKS)}")
    one_image = image_tflop(inference_steps, budget=budget)
    runs = notebook_03_runs(neighbour)
    models_04 = 1 + len(runs) + 1  # the pretrained adapter, each trained one, + Conceptrol

    def images(what, n):
        return _Part(f"{n} {what}", n * one_image, "sampling")

    if name == "01":
        n, rows = st["train_images"], st["dataset_rows"]
        return [_Part(f"feature cache: {n} images through the VAE and the image encoder",
                      feature_cache_tflop(n, budget=budget), "sampling"),
                _Part(f"masks: {rows} rows (train and test) through CLIPSeg", segmenter_tflop(rows, budget=budget),
                      "sampling")]
    if name == "02":
        return [images("images, one model at a time", NOTEBOOK_02_IMAGES)]
    if name == "03":
        steps = st["steps_per_variant"] if steps is None else steps
        train = sum(steps * training_tflop_per_step(v, checkpointing=checkpointing, budget=budget) for v in runs)
        reduced = sum(steps * gradient_mb(v, budget=budget) for v in runs)
        masked = "" if mask == "none" else f", mask {mask}"
        parts = [_Part(f"training {len(runs)} runs ({', '.join(runs)}{masked}) x {steps} steps", train, "training",
                       splits="training", reduced_mb=reduced),
                 images("sample images", PREVIEW_IMAGES_PER_MODEL * (1 + len(runs)) + CARD_GRID_IMAGES)]
        if mask in MASKED_REFERENCE:
            parts.insert(0, _Part(f"masked references: {st['train_images']} training images, background filled, "
                                  "through the image encoder", masked_reference_tflop(budget=budget), "sampling"))
        return parts
    if name == "04":
        gallery = SAMPLE_REFERENCES * GALLERY_PROMPTS * models_04
        return [images(f"images ({models_04} models: gallery, IP-scale sweep, panel, background removed, script)",
                       gallery + SWEEP_SCALES * models_04 + models_04 + BACKGROUND_IMAGES + 1)]
    if name == "05":
        grid_images = st["grid_images"] if grid_images is None else grid_images
        references = st["grid_references"] if references is None else references
        grid = _Part(f"grid of {grid_images} images over {references} references",
                     grid_images * one_image + references * s["image_encoder_tflop_per_reference"], "sampling",
                     splits="the grid")
        segmented = _Part(f"CLIPSeg on the grid's {grid_images} images (subject scores)",
                          segmenter_tflop(grid_images, budget=budget), "sampling", splits="the grid")
        return [grid, segmented, images("timing images", TIMING_IMAGES)]
    raise ValueError(f"notebook {name!r}: choose one of {', '.join(NOTEBOOKS)}")


def notebook_projection(name, *, neighbour: bool = False, steps: int | None = None, grid_images: int | None = None,
                        references: int | None = None, inference_steps: int | None = None,
                        checkpointing: bool = False, mask: str = "none", gpus: int = 1,
                        budget: dict | None = None) -> Projection:
    """Notebook `name`'s ("01" .. "05", or 1 .. 5) GPU work on `gpus` T4s at its defaults, projected from the
    counted budget: minutes at the expected efficiencies (TRAINING for training, SAMPLING for the rest) and
    at CEILING, with what runs and the assumption (`Projection.line()` says it in one sentence), and the
    expected minutes on one T4 and on two (`Projection.on`).

    gpus:            T4s (default 1): training splits its FLOPs and pays the gradient all-reduce each step, 05's
                     grid splits, the rest stays on one GPU (what a notebook runs in its own process)

    neighbour:       notebook 03 also trains the neighbour-paired model (opt-in); 04's bank has it too
    steps:           training steps per run in 03 (default: the counted run, 6 epochs)
    checkpointing:   03 trains with gradient checkpointing (the forward runs twice)
    mask:            03's MASK (MASKS; "none", the default): "reference" and "both" add one image-encoder pass
                     over the training images with their background filled (masked_reference_minutes), once
                     for all of 03's runs; "loss" adds nothing a FLOP count sees
    grid_images, references: notebook 05's grid (default: the counted default grid)
    inference_steps: denoising steps per generated image (default: the profile's 30)
    """
    budget = budget or t4_budget()
    name = f"{int(name):02d}" if str(name).isdigit() else str(name)
    parts = _notebook_parts(name, neighbour=neighbour, steps=steps, grid_images=grid_images, references=references,
                            inference_steps=inference_steps, checkpointing=checkpointing, mask=mask, budget=budget)
    if gpus < 1:
        raise ValueError(f"gpus {gpus!r}: at least 1")
    expected = {"training": TRAINING.expected, "sampling": SAMPLING.expected}

    def total(n, efficiency=None):
        return sum(p.minutes(efficiency or expected[p.kind], n) for p in parts)

    return Projection(name, total(gpus), total(gpus, CEILING.expected),
                      tuple((p.what, p.minutes(expected[p.kind], gpus)) for p in parts), assumption(budget), gpus,
                      tuple((n, total(n)) for n in sorted({1, 2, gpus})), _spread(parts, budget))


def _spread(parts: list[_Part], budget: dict) -> str:
    """How a notebook's parts spread over several GPUs, in words (the 2xT4 figure's brackets)."""
    split = list(dict.fromkeys(p.splits for p in parts if p.splits))
    if not split:
        return "the same: this notebook runs on one GPU"
    words = f"{' and '.join(split)} split over the GPUs"
    reduced = sum(p.allreduce_minutes(2) for p in parts)
    if reduced:
        words += (f", plus a gradient all-reduce each step ({gradient_mb('text_aware', budget=budget):.0f} MB for "
                  f"text-aware, {allreduce_seconds('text_aware', 2, budget=budget):.2f} s at an assumed "
                  f"{ALLREDUCE_GB_PER_S:g} GB/s: {_m(reduced)} min in all)")
    return words + ("" if all(p.splits for p in parts) else "; the rest on one GPU")


def notebook_minutes(name, **settings) -> float:
    """Projected T4 minutes of notebook `name` at the expected efficiencies (notebook_projection(...).minutes)."""
    return notebook_projection(name, **settings).minutes


def series_projection(**settings) -> Projection:
    """The five notebooks' projections added up (`settings` as notebook_projection takes them, gpus too)."""
    each = [notebook_projection(n, **settings) for n in NOTEBOOKS]
    return Projection("series", sum(p.minutes for p in each), sum(p.best for p in each),
                      tuple((f"notebook {p.notebook}", p.minutes) for p in each), each[0].assumption, each[0].gpus,
                      tuple((n, sum(p.minutes_on(n) for p in each)) for n, _ in each[0].on),
                      "each notebook as its own line says")


def series_minutes(**settings) -> float:
    """Projected T4 minutes of the whole series at its defaults, at the expected efficiencies."""
    return series_projection(**settings).minutes


def projections(budget: dict | None = None) -> dict:
    """The projected minutes of the budget file's "projections" section, at the expected efficiencies and at
    the ceiling (notebook 03's and the series' only when every one of 03's runs' variants was counted)."""
    budget = budget or t4_budget()
    at = {"expected": None, "ceiling": CEILING.expected}
    counted = all(v in budget["training"] for v in budget["settings"]["notebook_03_runs"])
    shown = [n for n in NOTEBOOKS if counted or n != "03"]
    nb = {n: notebook_projection(n, budget=budget) for n in shown}
    if counted:
        nb["series"] = series_projection(budget=budget)
    return {"t4_fp16_tflops": T4_FP16_TFLOPS,
            "efficiency": {e.kind: e.expected for e in (TRAINING, SAMPLING, CEILING)},
            "training_minutes_per_variant": {
                v: {k: training_minutes(v, efficiency=e, budget=budget) for k, e in at.items()}
                for v in budget["training"]},
            "training_minutes_per_variant_checkpointing": {
                v: {k: training_minutes(v, efficiency=e, checkpointing=True, budget=budget) for k, e in at.items()}
                for v in budget["training"] if "checkpointing" in budget["training"][v]},
            "seconds_per_image": {k: seconds_per_image(e, budget=budget) for k, e in at.items()},
            "notebook_minutes": {n: {"expected": p.minutes, "ceiling": p.best} for n, p in nb.items()}}


def summary_lines(budget: dict | None = None) -> list[str]:
    """The budget in words, every minute figure beside its efficiency: for a notebook cell, or the README
    (`python -c "from helpers.support.budget import summary_lines; print(*summary_lines(), sep='\\n')"`)."""
    b = budget or t4_budget()
    st, s = b["settings"], b["sampling"]
    lines = [f"Counted for a T4 ({b['how']['date']}, torch {b['how']['torch']}, no GPU: "
             f"helpers/support/t4_budget.json), the {st['profile']} profile's defaults at {st['resolution']} px:"]
    for v in b["training"]:
        ckpt = (f", {training_peak_gib(v, checkpointing=True, budget=b):.1f} GiB with gradient checkpointing"
                if "checkpointing" in b["training"][v] else "")
        lines.append(f"  training {v}: peak {training_peak_gib(v, budget=b):.1f} GiB at batch {st['train_batch_size']}"
                     f"{ckpt}; {training_tflop_per_step(v, budget=b):.2f} TFLOP per step, "
                     f"{st['steps_per_variant']} steps")
    lines.append(f"  sampling: {s['tflop_per_image']:.0f} TFLOP per image ({st['inference_steps']} steps, guidance "
                 f"{st['guidance_scale']:g}); peak {s['peak_gib']:.1f} GiB with one model, "
                 f"{s['gib_per_image']:.2f} GiB more per image of a call")
    g = b["segmenter"]
    lines.append(f"  segmenter ({g['model']}): {g['tflop_per_image']:.3f} TFLOP per image at {g['image_size']} px; "
                 f"peak {g['peak_gib']:.2f} GiB at batch {g['batch']}")
    lines.append("Projected minutes on a T4 at the expected efficiencies (in brackets: at the ceiling, the best case):")
    lines += [f"  {e.kind}: {e.label()}; {', '.join(x.split(':')[0] for x in e.sources)}"
              for e in (TRAINING, SAMPLING, CEILING)]
    p = projections(b)
    runs = ", ".join(f"{v} {m['expected']:.0f} ({m['ceiling']:.0f})"
                     for v, m in p["training_minutes_per_variant"].items())
    lines.append(f"  a training run: {runs} min; an image: {p['seconds_per_image']['expected']:.1f} "
                 f"({p['seconds_per_image']['ceiling']:.1f}) s")
    for n in p["notebook_minutes"]:
        proj = series_projection(budget=b) if n == "series" else notebook_projection(n, budget=b)
        what = "; ".join(w for w, _ in proj.parts) if n != "series" else "notebooks 01 to 05"
        lines.append(f"  {'the whole series' if n == 'series' else 'notebook ' + n}: {_m(proj.minutes)} "
                     f"({_m(proj.best)}) min: {what}")
    if "03" in p["notebook_minutes"]:
        extra = notebook_minutes("03", neighbour=True, budget=b) - notebook_minutes("03", budget=b)
        per_model = images_minutes(st["grid_images"] // st["grid_models"], segmented=True, budget=b)
        lines.append(f"  opt-in: notebook 03's neighbour-paired run adds {extra:.0f} min; each model added to "
                     f"notebook 05's grid, {per_model:.0f} min; a masked reference (MASK reference or both), "
                     f"{masked_reference_minutes(budget=b):.1f} min (the masked loss: nothing measurable)")
    if "series" in p["notebook_minutes"]:  # every notebook counted (a partial file, the tests': not)
        two = {n: notebook_projection(n, budget=b, gpus=2) for n in NOTEBOOKS}
        split = [n for n, proj in two.items() if proj.minutes < proj.minutes_on(1)]
        lines.append(f"On 2xT4 (Kaggle's T4 x2), notebooks {' and '.join(split)} on both GPUs: "
                     + ", ".join(f"notebook {n} {_m(two[n].minutes)} min" for n in split) + "; the others as on "
                     f"one; the whole series {_m(series_projection(budget=b, gpus=2).minutes)} min")
    return lines


# --------------------------------------------------------------------------------------------------
# Measured on a GPU: the fraction of the peak a time implies
# --------------------------------------------------------------------------------------------------


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


def feature_cache_tflop(images: int = 1, *, budget: dict | None = None) -> float:
    """Counted TFLOP of the feature cache (notebook 01) on `images` training images: the VAE encode
    (VAE_ENCODE_TFLOP) and one image-encoder pass each (the file's figure per reference is two passes, a
    reference and a zero image). The text encoder, under 1% of it, is left out, as in notebook 01's projection."""
    s = (budget or t4_budget())["sampling"]
    return images * (VAE_ENCODE_TFLOP + s["image_encoder_tflop_per_reference"] / 2)


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
