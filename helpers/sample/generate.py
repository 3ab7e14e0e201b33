"""Generate from reference images and prompts with the models of a bank.

    samples = generate(bank, refs, prompts, scales=(0.5, 1.0), seeds=(0, 1))   # list[Sample]
    samples = generate(bank, refs, prompts, masks={ref_id: mask})   # that reference's background painted white

`generate` runs diffusers' stock pipeline with precomputed image features (each reference goes through
the image encoder once, the same call the pipeline makes), in batches, one `torch.Generator` per image,
so an image depends on its seed and settings, not on the batch it was made in (up to floating-point
rounding: see `generate`). The models are those of a helpers.sample.bank.ModelBank; helpers.sample.gallery lays
samples out in grids, helpers.sample.saved saves them with their settings.

A pipeline call that runs out of GPU memory raises `OutOfMemory`, whose message names the knob: `batch_size`
(images per pipeline call).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable

import torch
from PIL import Image

if TYPE_CHECKING:  # the type only: Sample stays free of diffusers
    from .bank import ModelBank

GALLERY_PROMPTS = (
    "a cartoon drawing",
    "a cartoon drawing wearing a red hat",
    "a cartoon drawing in space at night",
    "a watercolor painting",
)


@dataclass
class Sample:
    """One generated image with everything needed to make it again."""

    image: Image.Image = field(repr=False)
    model: str  # a ModelBank name, e.g. "finetuned-text-aware"
    reference: str  # id of the reference image
    prompt: str
    scale: float  # IP-Adapter scale
    seed: int
    steps: int
    guidance: float
    negative_prompt: str = ""
    resolution: int = 512
    variant: str = ""  # "vanilla" or "text_aware"
    profile: str = ""  # "full" or "tiny" (tiny: random weights, the picture means nothing)
    reference_image: Image.Image | None = field(default=None, repr=False, compare=False)
    sampler: str = ""  # the pipeline's scheduler class, e.g. "DDIMScheduler"
    concept: str = ""  # Conceptrol: the prompt's words that name the subject; "" for every other model
    adapter_sha256: str = ""  # the identity of the weights (helpers.sample.registry.adapter_sha256)
    background: str = "kept"  # "removed": the reference's background was painted white first (generate's masks)

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (no images)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "reference_image")}


SETTING_NAMES = tuple(f.name for f in fields(Sample) if f.name not in ("image", "reference_image"))


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


MAX_BATCH = 8  # images per pipeline call at most (pick_batch_size)


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory in a pipeline call. The message names the batch size to lower (`batch_size`,
    images per pipeline call) and what to do at 1."""

    def __init__(self, message: str, batch_size: int):
        super().__init__(message)
        self.batch_size = batch_size


def out_of_memory_advice(batch_size: int, knob: str) -> str:
    """What to do after an out-of-memory error at `batch_size` images per pipeline call. knob: where to set a
    smaller one, with {k} for the value, e.g. "pass batch_size={k} to generate()"."""
    if batch_size > 1:
        k = max(1, batch_size // 2)
        return (f"Lower the batch size (images per pipeline call) from {batch_size} to {k}: {knob.format(k=k)}. "
                f"Every image has its own seeded generator, so a smaller batch makes the same images, up to "
                f"floating-point rounding.")
    return ("It ran out at one image per pipeline call: free GPU memory (Runtime > Restart session, or close other "
            "notebooks on this GPU) or lower the resolution.")


def pick_batch_size(device, resolution: int = 512, guidance: float = 7.5) -> int:
    """Images per pipeline call: 1 on a CPU (no gain there); on a GPU as many as 70% of the free memory holds,
    up to MAX_BATCH, by the counted sampling memory (helpers.support.budget_counts.sampling_memory: the denoising
    UNet's memory per image plus one image's VAE decode, counted at fp16 with VAE slicing for a T4)."""
    from ..support.budget_counts import fits_batch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return fits_batch(free / 2**30, resolution, guidance, margin=0.7, most=MAX_BATCH)


def as_list(x) -> list:
    """A value or an iterable of values (a string is one value) -> list."""
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        return [x]
    return list(x)


def _prompt_table(references: dict, prompts) -> dict[str, list[str]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, dict):
        unknown = [r for r in prompts if r not in references]
        if unknown:
            raise KeyError(f"prompts given for unknown references {unknown}; references: {list(references)}")
        return {r: as_list(prompts.get(r, [])) for r in references}
    return {r: list(prompts) for r in references}


def generate(bank: ModelBank, references: dict, prompts, *, models=None, scales=(1.0,), seeds=(0,), steps=None,
             guidance=None, negative_prompt: str = "", batch_size=None, resolution=None, concepts=None, masks=None,
             progress: bool | Callable[[int, int], None] = True,
             on_step: Callable[[], None] | None = None) -> list[Sample]:
    """Images for every model x scale x reference x prompt x seed, in that order.

    references: {id: PIL image}
    prompts:    a prompt or list of prompts for every reference, or {reference id: [prompts]}
    models:     bank names (default: all available); scales: IP-Adapter scales; seeds: one image per seed
    steps, guidance, resolution: default to the profile's (num_inference_steps, guidance_scale, resolution)
    batch_size: images per pipeline call (default pick_batch_size); a call holds one reference's prompts x
                seeds (diffusers repeats one reference's features over a call). Results do not depend on
                it beyond floating-point rounding: every image has its own torch.Generator(seed) on the CPU,
                and a batched matrix product may sum in another order (tests/sample/test_generate.py: pixels
                within 2 of 255 between batch 1 and 3 on the tiny profile). Out of GPU memory: OutOfMemory,
                whose message says to lower it
    concepts:   {prompt: the words naming its subject}, for a model that masks by them (Conceptrol); a prompt
                not in it gets helpers.data.subjects.subject_of(prompt), the rule the panel and the
                evaluation use (the whole prompt when no words name a subject: never run unmasked)
    masks:      {reference id: bool [H, W] mask at that reference's size, True on the character}: those
                references reach the image encoder with every pixel off the mask set to white
                (helpers.data.masks.fill_background), for any model; their samples say background="removed"
                and keep the painted reference as reference_image
    progress:   True for a tqdm bar, False for none, or a callable(done images, total images)
    on_step:    called after every denoising step of every pipeline call (a widget's progress bar)
    """
    from tqdm.auto import tqdm

    if not isinstance(references, dict) or not all(isinstance(v, Image.Image) for v in references.values()):
        raise TypeError("references must be a dict {id: PIL.Image}")
    call = _call_settings(bank, steps, guidance, resolution, negative_prompt, on_step)
    call["concepts"] = dict(concepts or {})
    models = _available(bank, models)
    scales = [float(s) for s in as_list(scales)]
    jobs = _jobs(references, prompts, seeds)
    batch_size = int(batch_size or pick_batch_size(bank.device, call["resolution"], call["guidance"]))
    call["batch_size"] = batch_size
    total = len(models) * len(scales) * sum(map(len, jobs.values()))
    bar = tqdm(total=total, desc="generating", unit="img") if progress is True else None
    images = {r: im.convert("RGB") for r, im in references.items()}
    if masks:
        from ..data.masks import fill_background  # here: only this option needs the data helpers

        unknown = [r for r in masks if r not in references]
        if unknown:
            raise KeyError(f"masks given for unknown references {unknown}; references: {list(references)}")
        images.update({r: fill_background(images[r], m) for r, m in masks.items()})
    call["removed"] = set(masks or ())
    out = []
    for name in models:
        bank.use(name)
        for scale in scales:
            bank.set_ip_scale(scale)  # per-layer for a model with ip_layers (InstantStyle), checked
            for r, ref_jobs in jobs.items():
                for start in range(0, len(ref_jobs), batch_size):
                    chunk = ref_jobs[start:start + batch_size]
                    out += _pipeline_call(bank, name, scale, r, images[r], chunk, call)
                    if bar is not None:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(len(out), total)
    if bar is not None:
        bar.close()
    return out


def _call_settings(bank, steps, guidance, resolution, negative_prompt, on_step) -> dict:
    """The settings every pipeline call of one `generate` shares (the profile's where not given)."""
    profile = bank.profile
    guidance = float(profile.guidance_scale if guidance is None else guidance)
    return {"steps": int(steps or profile.num_inference_steps), "guidance": guidance,
            "resolution": int(resolution or profile.resolution), "negative_prompt": negative_prompt,
            "cfg": guidance > 1 and bank.pipe.unet.config.time_cond_proj_dim is None,  # diffusers' own rule
            "on_step": on_step}


def _available(bank, models) -> list[str]:
    models = bank.names if models is None else as_list(models)
    for m in models:
        if m not in bank.models:
            raise KeyError(f"model {m!r} is not available: "
                           f"{bank.missing.get(m, 'unknown name')}; available: {', '.join(bank.names)}")
    if bank.device.type == "cuda" and hasattr(bank.pipe.vae, "enable_slicing"):
        bank.pipe.vae.enable_slicing()  # decode one image at a time: big batches fit, same result
    return models


def _jobs(references: dict, prompts, seeds) -> dict[str, list[tuple[str, int]]]:
    """{reference: [(prompt, seed), ...]}: diffusers repeats one reference's features across a call's
    prompts, so a pipeline call holds one reference's prompts x seeds."""
    table = _prompt_table(references, prompts)
    seeds = [int(s) for s in as_list(seeds)]
    return {r: [(p, s) for p in table[r] for s in seeds] for r in references}


def _pipeline_call(bank, name: str, scale: float, ref_id: str, image, chunk, call: dict) -> list[Sample]:
    """One call of the stock pipeline: one reference, a chunk of (prompt, seed), the active model and scale."""
    neg, pos = bank.image_features(image)  # (1, 1, tokens, width) each
    embeds = torch.cat([neg, pos]) if call["cfg"] else pos  # the pipeline's [negative, positive] order
    concepts = [""] * len(chunk)
    if bank.uses_concepts:  # one list of token positions per conditional row, for this call only
        from ..model.conceptrol import (  # here: Sample stays free of diffusers
            clear_concepts,
            concept_token_indices,
            set_concepts,
        )
        from ..data.subjects import subject_of

        concepts = [call["concepts"].get(p) or subject_of(p) for p, _ in chunk]
        set_concepts(bank.pipe.unet, [concept_token_indices(bank.pipe.tokenizer, p, c)
                                      for (p, _), c in zip(chunk, concepts)], guided=call["cfg"])
    on_step = call["on_step"]
    hook = {} if on_step is None else {"callback_on_step_end": lambda _pipe, _i, _t, kw: (on_step(), kw)[1]}
    try:
        with torch.no_grad(), _oom_named(call, name, len(chunk)):
            result = bank.pipe(
                prompt=[p for p, _ in chunk],
                negative_prompt=[call["negative_prompt"]] * len(chunk) if call["cfg"] else None,
                ip_adapter_image_embeds=[embeds], num_inference_steps=call["steps"], guidance_scale=call["guidance"],
                height=call["resolution"], width=call["resolution"],
                generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk], **hook,
            ).images
    finally:
        if bank.uses_concepts:
            clear_concepts(bank.pipe.unet)
    return [Sample(im, name, ref_id, p, scale, s, call["steps"], call["guidance"], call["negative_prompt"],
                   call["resolution"], bank.models[name].variant, bank.profile.name, image,
                   type(bank.pipe.scheduler).__name__, c, bank.models[name].sha256,
                   "removed" if ref_id in call["removed"] else "kept")
            for (p, s), im, c in zip(chunk, result, concepts)]


@contextlib.contextmanager
def _oom_named(call: dict, name: str, n_images: int):
    """torch's CUDA out-of-memory error in a pipeline call -> OutOfMemory naming the batch size to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed call's blocks back before anything else runs
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else "CUDA out of memory"
        raise OutOfMemory(f"Out of GPU memory generating {n_images} images of {name} in one pipeline call at "
                          f"{call['resolution']} px ({detail}). "
                          + out_of_memory_advice(call["batch_size"], "pass batch_size={k} to generate()"),
                          call["batch_size"]) from None
