"""Generate from reference images and prompts with the models of a bank, and pick held-out references.

    refs, where = held_out_references(profile, data_dir, n=4)      # {id: PIL image} from the test split
    samples = generate(bank, refs, prompts, scales=(0.5, 1.0), seeds=(0, 1))   # list[Sample]

`generate` runs diffusers' stock pipeline with precomputed image features (each reference goes through
the image encoder once, the same call the pipeline makes), in batches, one `torch.Generator` per image,
so an image depends on its seed and settings, not on the batch it was made in. The models are those of a
helpers.bank.ModelBank; helpers.figures lays samples out in grids, helpers.sample_files saves them with
their settings.

References: `pick_references` is the one rule for choosing held-out references (one per near-duplicate
group, so a mirrored copy is never a second reference; groups drawn at random with a seed), used by
notebooks 02 and 04 (`held_out_references`) and by the evaluation of notebook 05.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import data as hdata
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

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (no images)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "reference_image")}


SETTING_NAMES = tuple(f.name for f in fields(Sample) if f.name not in ("image", "reference_image"))


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def pick_batch_size(device, resolution: int = 512, guidance: float = 7.5) -> int:
    """Images per pipeline call: 1 on a CPU (no gain there); on a GPU as many as the free memory allows,
    up to 8 (an estimated ~1 GB per guided 512 px image at fp16 with VAE slicing; not measured on a T4)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 1.0e9 * (resolution / 512) ** 2 * (1.0 if guidance > 1 else 0.6)
    return int(max(1, min(8, 0.7 * free // per_image)))


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
             guidance=None, negative_prompt: str = "", batch_size=None, resolution=None,
             progress: bool | Callable[[int, int], None] = True,
             on_step: Callable[[], None] | None = None) -> list[Sample]:
    """Images for every model x scale x reference x prompt x seed, in that order.

    references: {id: PIL image}
    prompts:    a prompt or list of prompts for every reference, or {reference id: [prompts]}
    models:     bank names (default: all available); scales: IP-Adapter scales; seeds: one image per seed
    steps, guidance, resolution: default to the profile's (num_inference_steps, guidance_scale, resolution)
    batch_size: images per pipeline call (default pick_batch_size); a call holds one reference's prompts x
                seeds (diffusers repeats one reference's features over a call). Results do not depend on
                it beyond floating-point rounding: every image has its own torch.Generator(seed) on the CPU
    progress:   True for a tqdm bar, False for none, or a callable(done images, total images)
    on_step:    called after every denoising step of every pipeline call (a widget's progress bar)
    """
    from tqdm.auto import tqdm

    if not isinstance(references, dict) or not all(isinstance(v, Image.Image) for v in references.values()):
        raise TypeError("references must be a dict {id: PIL.Image}")
    profile = bank.profile
    steps = int(steps or profile.num_inference_steps)
    guidance = float(profile.guidance_scale if guidance is None else guidance)
    resolution = int(resolution or profile.resolution)
    models = bank.names if models is None else as_list(models)
    for m in models:
        if m not in bank.models:
            raise KeyError(f"model {m!r} is not available: "
                           f"{bank.missing.get(m, 'unknown name')}; available: {', '.join(bank.names)}")
    table = _prompt_table(references, prompts)
    seeds = [int(s) for s in as_list(seeds)]
    scales = [float(s) for s in as_list(scales)]
    batch_size = int(batch_size or pick_batch_size(bank.device, resolution, guidance))
    # diffusers repeats one reference's features across a call's prompts, so a batch holds one reference:
    # its prompts x seeds, in chunks of batch_size
    jobs = {r: [(p, s) for p in table[r] for s in seeds] for r in references}
    total = len(models) * len(scales) * sum(map(len, jobs.values()))
    bar = tqdm(total=total, desc="generating", unit="img") if progress is True else None
    cfg = guidance > 1 and bank.pipe.unet.config.time_cond_proj_dim is None  # diffusers' own rule
    if bank.device.type == "cuda" and hasattr(bank.pipe.vae, "enable_slicing"):
        bank.pipe.vae.enable_slicing()  # decode one image at a time: big batches fit, same result
    images = {r: im.convert("RGB") for r, im in references.items()}
    step_hook = {} if on_step is None else {"callback_on_step_end": lambda _pipe, _i, _t, kw: (on_step(), kw)[1]}
    out, done = [], 0
    for name in models:
        pipe = bank.use(name)
        for scale in scales:
            bank.set_ip_scale(scale)  # per-layer for a model with ip_layers (InstantStyle), checked
            for r, ref_jobs in jobs.items():
                neg, pos = bank.image_features(images[r])  # (1, 1, tokens, width) each
                embeds = torch.cat([neg, pos]) if cfg else pos  # the pipeline's [negative, positive] order
                for start in range(0, len(ref_jobs), batch_size):
                    chunk = ref_jobs[start:start + batch_size]
                    with torch.no_grad():
                        result = pipe(
                            prompt=[p for p, _ in chunk],
                            negative_prompt=[negative_prompt] * len(chunk) if cfg else None,
                            ip_adapter_image_embeds=[embeds],
                            num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                            width=resolution, generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk],
                            **step_hook,
                        ).images
                    for (p, s), im in zip(chunk, result):
                        out.append(Sample(im, name, r, p, scale, s, steps, guidance, negative_prompt, resolution,
                                          bank.models[name].variant, profile.name, images[r],
                                          type(pipe.scheduler).__name__))
                    done += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(done, total)
    if bar is not None:
        bar.close()
    return out


# --------------------------------------------------------------------------------------------------
# Held-out references: one rule
# --------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """One held-out reference image with its own caption."""

    id: str
    image: Image.Image = field(repr=False)
    caption: str
    group: str = ""  # near-duplicate group from helpers.data (mirrored copies share one)


def column(ds, name: str, default=None) -> list | None:
    """A column of a datasets.Dataset (or list of dicts) as a list; if it is absent: [default(i) for each
    row] when a default is given, else None."""
    names = getattr(ds, "column_names", None) or (list(ds[0].keys()) if len(ds) else [])
    if name in names:
        return list(ds[name]) if hasattr(ds, "column_names") else [row[name] for row in ds]
    return None if default is None else [default(i) for i in range(len(ds))]


def pick_references(test, n: int, *, seed: int = 0) -> list[Reference]:
    """Up to n references from a test split (columns image, text, and group / id when present): one per
    group, so that a mirrored copy never counts as a second reference; groups chosen at random (seeded),
    returned in a stable order. Fewer than n when the split has fewer groups."""
    if n < 1:
        raise ValueError(f"need at least one reference, got n={n}")
    ids = [str(i) for i in column(test, "id", default=lambda i: f"test{i}")]
    groups = [str(g) for g in column(test, "group", default=lambda i: ids[i])]
    first: dict[str, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    order = sorted(first)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(order))[:n].tolist())
    rows = [first[order[k]] for k in chosen]
    return [Reference(ids[i], test[i]["image"].convert("RGB"), str(test[i]["text"]), groups[i]) for i in rows]


class References(dict):
    """{id: PIL image} of held-out references, and `captions` {id: the reference's own caption}."""

    def __init__(self, references: list[Reference]):
        super().__init__((r.id, r.image) for r in references)
        self.captions = {r.id: r.caption for r in references}


def held_out_references(profile, data_dir, n: int = 4, *, seed: int = 0) -> tuple[References, str]:
    """Up to n held-out reference images {id: PIL image} (a `References` dict, whose `.captions` holds their
    captions), picked by `pick_references` (one per near-duplicate group, seeded), from notebook 01's test
    split in data_dir, and a sentence saying where they came from.

    The data is read as notebook 01 prepared it, whatever its source (helpers.data.use_prepared); if data_dir
    holds no prepared data yet, it is prepared here from the profile's dataset as notebook 01 does.
    """
    data_dir = Path(data_dir)
    had = (data_dir / "prepared.json").is_file()
    prep = hdata.use_prepared(data_dir, profile, announce=False, progress=False)
    where = (f"the test split notebook 01 wrote in {data_dir}" if had
             else f"the test split, prepared now in {data_dir} as notebook 01 does (it had not run)")
    test = prep.test
    if len(test) == 0:
        raise ValueError(f"{data_dir}: the test split is empty (test_fraction={prep.info.get('test_fraction')}); "
                         "prepare the data with a test_fraction above 0")
    refs = pick_references(test, n, seed=seed)
    return References(refs), f"{len(refs)} held-out references (one per group) from {where}"
