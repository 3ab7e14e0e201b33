"""What the full profile costs on a free Colab T4, notebook by notebook: the figures the notebooks and the
README quote, projected from the counted budget (helpers.support.budget_counts reads t4_budget.json).

    from helpers.support.budget import notebook_projection, series_minutes
    print(notebook_projection("03").line())   # notebook 03's defaults on a T4, with the assumption
    print(f"{series_minutes():.0f} min for the whole series")

Each figure is counted FLOPs over the expected fraction of the T4's fp16 peak (budget_counts: TRAINING 8%,
SAMPLING 12%, each with its sources; CEILING 35%, the best case): quote a figure with its efficiency.
`summary_lines()` says the whole budget in words (README's block, word for word).

The segmenter's work is counted where it runs: notebook 01 masks every row (train and test) once, notebook
05 segments every generated image of its grid for the subject scores, and a masked reference in notebook 03
(`mask="reference"` or `"both"`) costs one more image-encoder pass over the training images with their
background filled; the masked loss weights an elementwise MSE, nothing a FLOP count sees.

N GPUs (Kaggle's free T4 x2): every projection also gives the time on 2xT4 (`notebook_projection(name,
gpus=N)`; `Projection.line()` says both). Training keeps its global batch over the GPUs, so each does 1/N of a
step's FLOPs at the same fraction of its peak, and then pays a ring all-reduce of the gradients of the
trainable parameters, fp32, every step (budget_counts.allreduce_seconds). 05's grid splits by job with nothing
to exchange: time / N (notebook 05 launches it on every GPU, helpers.evaluate.launch). What a notebook does in
its own process stays on one GPU: 02, 04, 03's samples, and 01, whose feature cache (about 1.5 min of a T4)
would split under a launch too, but a second process would spend about as long loading its models as it saved.

Reading it needs no torch: the file is JSON, loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .budget_counts import (ALLREDUCE_GB_PER_S, CEILING, SAMPLING, T4_FP16_TFLOPS, TRAINING, allreduce_seconds,
                            feature_cache_tflop, gradient_mb, image_tflop, images_minutes, minutes,
                            seconds_per_image, segmenter_tflop, t4_budget, training_minutes, training_peak_gib,
                            training_tflop_per_step)

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
