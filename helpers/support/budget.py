"""What the full profile costs on a free Colab T4, counted: the figures the notebooks and the README quote.

    from helpers.support.budget import EFFICIENCIES, efficiency_label, grid_minutes, training_minutes
    for e in EFFICIENCIES:
        print(f"{training_minutes('text_aware', efficiency=e):.0f} min per variant at {efficiency_label(e)}")

The counts live in `t4_budget.json` beside this module (package data, so a pip install from git has it).
bench/t4_budget.py writes it: SD 1.5 + IP-Adapter Plus at their real sizes, built from their configs as fake
tensors (shapes and dtypes, no weights, no GPU), run through the project's real training step and the
sampling call of helpers.sample.generate, as a T4 runs them: frozen weights in fp16, trainable ones in
fp32, CUDA autocast's cast policy (emulated on the CPU and checked against CUDA's own autocast kernels),
SDPA as the memory-efficient kernel (a T4, sm75, has no flash attention). Memory is torch's MemTracker at the
second training step (AdamW's state exists then): what `torch.cuda.max_memory_allocated` would report; the
CUDA context (~0.3-0.5 GiB) and the allocator's slack come on top. FLOPs are torch's FlopCounterMode's
(matrix multiplies, convolutions, attention). The file's "how" says which torch, when, and what was emulated.

Minutes are projections, not measurements: counted FLOPs over a stated fraction of the T4's 65 TFLOPS fp16
tensor-core peak. Quote a figure with its efficiency (`efficiency_label`). No fraction has been measured on
a T4 yet; the GPU check (`./run.sh gpu-check`) measures the fraction a GPU reaches.

Reading it needs no torch: the file is JSON, loaded once.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources

T4_FP16_TFLOPS = 65  # NVIDIA's datasheet: peak dense fp16 tensor-core rate of a Tesla T4
EFFICIENCIES = (0.12, 0.25, 0.35)  # fractions of that peak the figures are projected at (low, middle, high)
BUDGET_FILE = "t4_budget.json"


@lru_cache(maxsize=1)
def t4_budget() -> dict:
    """The counted budget (t4_budget.json), loaded once. Keys: "how" (what was counted, how, with which torch,
    when), "settings" (the full profile's defaults it was counted at), "training" ({variant: {"plain",
    "checkpointing"}: peak_gib, parts_gib, tflop}), "sampling" (per image, per reference, memory),
    "projections" (minutes at each of EFFICIENCIES), "emulation_check"."""
    return json.loads(resources.files(__package__).joinpath(BUDGET_FILE).read_text())


def efficiency_label(efficiency: float) -> str:
    """"25% of the T4's 65 TFLOPS fp16 peak": the words to put beside a projected figure."""
    return f"{efficiency:.0%} of the T4's {T4_FP16_TFLOPS} TFLOPS fp16 peak"


def minutes(tflop: float, efficiency: float = 0.25) -> float:
    """Minutes a T4 takes for `tflop` TFLOP when it sustains `efficiency` of its fp16 peak."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency {efficiency!r}: a fraction of the peak, above 0 and at most 1 (e.g. 0.25)")
    return tflop / (efficiency * T4_FP16_TFLOPS) / 60


def training_tflop_per_step(variant: str = "text_aware", *, checkpointing: bool = False,
                            budget: dict | None = None) -> float:
    """Counted TFLOP of one training step (forward, backward, AdamW) at the profile's batch and resolution;
    with gradient checkpointing the forward runs twice."""
    return _training(variant, checkpointing, budget)["tflop"]


def _training(variant: str, checkpointing: bool, budget: dict | None) -> dict:
    runs = (budget or t4_budget())["training"]
    if variant not in runs:
        raise KeyError(f"variant {variant!r}: counted are {', '.join(runs)}")
    return runs[variant]["checkpointing" if checkpointing else "plain"]


def training_minutes(variant: str = "text_aware", steps: int | None = None, efficiency: float = 0.25, *,
                     checkpointing: bool = False, budget: dict | None = None) -> float:
    """Projected T4 minutes of `steps` training steps (default: the full profile's run, 6 epochs over the
    training split) of `variant` at `efficiency` of the T4's peak."""
    budget = budget or t4_budget()
    steps = budget["settings"]["steps_per_variant"] if steps is None else steps
    return minutes(steps * training_tflop_per_step(variant, checkpointing=checkpointing, budget=budget), efficiency)


def notebook_03_minutes(efficiency: float = 0.25, *, budget: dict | None = None) -> float:
    """Projected T4 minutes of notebook 03's training runs at their defaults (vanilla, text-aware and the
    neighbour-paired text-aware model: settings["notebook_03_runs"])."""
    budget = budget or t4_budget()
    runs = budget["settings"]["notebook_03_runs"]
    return sum(training_minutes(v, efficiency=efficiency, budget=budget) for v in runs)


def images_minutes(n_images: int, efficiency: float = 0.25, *, references: int = 0,
                   budget: dict | None = None) -> float:
    """Projected T4 minutes to generate `n_images` at the profile's sampling settings (30 DDIM steps with
    guidance: the UNet steps plus the VAE decode, at the evaluation's batch), plus the image encoder once for
    each of `references` reference images. Scoring (CLIP, DINO) is not counted: under 1% of it."""
    s = (budget or t4_budget())["sampling"]
    return minutes(n_images * s["tflop_per_image"] + references * s["image_encoder_tflop_per_reference"], efficiency)


def seconds_per_image(efficiency: float = 0.25, *, budget: dict | None = None) -> float:
    """Projected T4 seconds per generated image (images_minutes of one image, in seconds)."""
    return 60 * images_minutes(1, efficiency, budget=budget)


def grid_minutes(efficiency: float = 0.25, *, budget: dict | None = None) -> float:
    """Projected T4 minutes of notebook 05's default grid (settings["grid_images"] images over
    settings["grid_references"] references)."""
    budget = budget or t4_budget()
    return images_minutes(budget["settings"]["grid_images"], efficiency,
                          references=budget["settings"]["grid_references"], budget=budget)


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


def projections(budget: dict | None = None) -> dict:
    """The projected minutes of the budget file's "projections" section, at each of EFFICIENCIES (notebook 03's
    only when every one of its runs' variants was counted)."""
    budget = budget or t4_budget()
    at = {f"{e:g}": e for e in EFFICIENCIES}
    complete = all(v in budget["training"] for v in budget["settings"]["notebook_03_runs"])
    return {"t4_fp16_tflops": T4_FP16_TFLOPS,
            "training_minutes_per_variant": {
                v: {k: training_minutes(v, efficiency=e, budget=budget) for k, e in at.items()}
                for v in budget["training"]},
            "training_minutes_per_variant_checkpointing": {
                v: {k: training_minutes(v, efficiency=e, checkpointing=True, budget=budget) for k, e in at.items()}
                for v in budget["training"] if "checkpointing" in budget["training"][v]},
            "notebook_03_minutes": ({k: notebook_03_minutes(e, budget=budget) for k, e in at.items()}
                                    if complete else {}),
            "notebook_05_grid_minutes": {k: grid_minutes(e, budget=budget) for k, e in at.items()},
            "seconds_per_image": {k: seconds_per_image(e, budget=budget) for k, e in at.items()}}


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
    p = projections(b)
    for e in EFFICIENCIES:
        k = f"{e:g}"
        runs = ", ".join(f"{v} {m[k]:.0f} min" for v, m in p["training_minutes_per_variant"].items())
        nb03 = f"; notebook 03 {p['notebook_03_minutes'][k]:.0f} min" if p["notebook_03_minutes"] else ""
        lines.append(f"  at {efficiency_label(e)}: training {runs}{nb03}; notebook 05's grid ({st['grid_images']} "
                     f"images) {p['notebook_05_grid_minutes'][k]:.0f} min, {p['seconds_per_image'][k]:.1f} s per image")
    return lines


def fits_batch(free_gib: float, resolution: int = 512, guidance: float = 7.5, *, margin: float = 0.7,
               most: int = 8, budget: dict | None = None) -> int:
    """Images per pipeline call that fit `margin` of `free_gib` (what the GPU has free with the models loaded),
    from the counted sampling memory; at least 1, at most `most`."""
    per_image, overhead = sampling_memory(resolution, guidance, budget=budget)
    return int(max(1, min(most, math.floor((margin * free_gib - overhead) / per_image))))
