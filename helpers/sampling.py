"""Generate from reference images and prompts with several adapters, side by side, and keep the settings.

The models to compare (notebook 04, and the evaluation in notebook 05):

    pretrained            IP-Adapter Plus as published (profile.ip_adapter), diffusers' vanilla path
    finetuned-vanilla     runs_dir/vanilla/adapter.safetensors     (notebook 03, variant "vanilla")
    finetuned-text-aware  runs_dir/text_aware/adapter.safetensors  (notebook 03, variant "text_aware")

They share one pipeline (`load_models` -> `ModelBank`): one VAE, text encoder, image encoder and base UNet
in memory, a `TextAwareUNet2DConditionModel` whose text-image block is set to None for the vanilla models
(then it is exactly diffusers' UNet). Only the adapter weights differ between models: the Resampler
(~30M parameters in SD 1.5 Plus), the 16 `to_k_ip` / `to_v_ip` pairs (~19M) and, for the text-aware
model, its block. Each model's copy of them stays on the device, and `ModelBank.use(name)` points the
live parameters at that copy (`param.data = tensor`): no copy, no rounding, so a bank model computes
exactly what a standalone `load_pipeline(..., adapter=file)` computes. Three models at fp16 cost the
base pipeline (~3.4 GB: UNet 860M, ViT-H/14 image encoder 632M, text encoder 123M, VAE 84M parameters)
plus ~0.1 GB per adapter (~49M parameters): they fit a T4's 15 GB.

`generate` runs diffusers' stock pipeline with precomputed image features (each reference goes through
the image encoder once, the same call the pipeline makes), in batches, one `torch.Generator` per image,
so an image depends on its seed and settings, not on the batch it was made in. `image_grid` lays the
results out as references x models (x scales); `save_samples` writes PNGs whose settings travel in the
PNG text chunks and in an index.json / index.csv beside them; `read_settings` / `load_saved` read them back.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import textwrap
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .adapter import (
    BLOCK_PREFIX,
    AdapterFileError,
    TextImageCrossAttention,
    check_adapter_tensors,
    ip_adapter_layer_keys,
    load_pipeline,
    read_adapter_file,
)

PRETRAINED = "pretrained"
FINETUNED = {  # model name -> (folder under runs_dir, variant)
    "finetuned-vanilla": ("vanilla", "vanilla"),
    "finetuned-text-aware": ("text_aware", "text_aware"),
}
MODEL_NAMES = (PRETRAINED, *FINETUNED)
ADAPTER_FILE = "adapter.safetensors"
SETTINGS_KEY = "ipa-settings"  # PNG text chunk holding every setting as JSON
INDEX_JSON, INDEX_CSV = "index.json", "index.csv"


# --------------------------------------------------------------------------------------------------
# One generated image and the settings that made it
# --------------------------------------------------------------------------------------------------


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

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (no images)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "reference_image")}


SETTING_NAMES = tuple(f.name for f in fields(Sample) if f.name not in ("image", "reference_image"))


# --------------------------------------------------------------------------------------------------
# The adapter weights of a pipeline, by name, and the official file format -> those names
# --------------------------------------------------------------------------------------------------


def adapter_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The live adapter parameters of a UNet with one IP-Adapter Plus loaded, by stable names:
    `image_proj.<diffusers Resampler name>` and `ip_adapter.{k}.to_{k,v}_ip.0.weight` (k = 1, 3, ..., 31).
    The text-image block is not included (it is swapped as a whole module)."""
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    params = {f"image_proj.{n}": p for n, p in resampler.named_parameters()}
    procs = unet.attn_processors
    for k, (name, _) in ip_adapter_layer_keys(unet).items():
        params.update({f"ip_adapter.{k}.{n}": p for n, p in procs[name].named_parameters()})
    return params


def resampler_from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tencent-ailab Resampler keys -> diffusers' IPAdapterPlusImageProjection keys (what diffusers'
    `_convert_ip_adapter_image_proj_to_diffusers` does; the inverse of adapter._resampler_to_official)."""
    out = {}
    rename = {"0.norm1.": "ln0.", "0.norm2.": "ln1.", "0.to_q.weight": "attn.to_q.weight",
              "0.to_out.weight": "attn.to_out.0.weight", "1.0.": "ff.0.", "1.1.weight": "ff.1.net.0.proj.weight",
              "1.3.weight": "ff.1.net.2.weight"}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:  # latents, proj_in, proj_out, norm_out
            out[key] = value
            continue
        i, rest = m.groups()
        if rest == "0.to_kv.weight":  # (2 * inner, dim): to_k stacked on to_v
            out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = value.chunk(2, dim=0)
            continue
        for old, new in rename.items():
            if rest.startswith(old):
                out[f"layers.{i}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise KeyError(f"unexpected Resampler key image_proj.{key}")
    return out


def official_to_live(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's official keys -> the names of `adapter_parameters` (the block's keys are left out)."""
    out = {f"image_proj.{k}": v for k, v in resampler_from_official(
        {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}).items()}
    for key, value in tensors.items():
        m = re.fullmatch(r"ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight", key)
        if m:
            out[f"ip_adapter.{m.group(1)}.{m.group(2)}.0.weight"] = value
    return out


@dataclass
class AdapterWeights:
    """One model of the bank: its adapter tensors (on the device) and where they came from."""

    name: str
    variant: str  # "vanilla" or "text_aware"
    source: str  # file the weights were read from
    params: dict[str, torch.Tensor] = field(repr=False)  # adapter_parameters() name -> tensor
    block: TextImageCrossAttention | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# The bank of models
# --------------------------------------------------------------------------------------------------


class ModelBank:
    """Several IP-Adapter models over one shared pipeline. Build it with `load_models`.

    names:   the available models, in MODEL_NAMES order
    missing: model name -> why it is not available (a message naming the file and what to do)
    pipe:    the shared diffusers StableDiffusionPipeline; `use(name)` puts a model's adapter in it
    """

    def __init__(self, pipe, profile, models: dict[str, AdapterWeights], missing: dict[str, str]):
        self.pipe = pipe
        self.profile = profile
        self.models = models
        self.missing = missing
        self.active: str | None = None
        self._live = adapter_parameters(pipe.unet)
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # image digest -> (negative, positive)

    @property
    def names(self) -> list[str]:
        return [n for n in MODEL_NAMES if n in self.models] + [n for n in self.models if n not in MODEL_NAMES]

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def describe(self) -> str:
        """Which models are available and which are not, with the reason."""
        lines = [f"{n}: {self.models[n].variant}, {self.models[n].source}" for n in self.names]
        lines += [f"{n}: NOT AVAILABLE - {msg}" for n, msg in self.missing.items()]
        return "\n".join(lines)

    def use(self, name: str):
        """Point the pipeline at model `name`'s adapter weights (exact: the tensors themselves, no copy).
        Returns the pipeline."""
        if name not in self.models:
            why = self.missing.get(name, f"not one of the bank's models ({', '.join(self.names)})")
            raise KeyError(f"model {name!r} is not available: {why}")
        if self.active != name:
            model = self.models[name]
            for key, param in self._live.items():
                param.data = model.params[key]
            self.pipe.unet.text_image_attn = model.block  # None: exactly the vanilla UNet
            self.active = name
        return self.pipe

    def image_features(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) image-encoder features of a reference, each (1, 1, tokens, width):
        the penultimate hidden states of the reference and of a zero image, from the same
        `pipe.encode_image` call the pipeline makes (257 x 1280 for ViT-H/14). Cached per image content;
        they do not depend on the model, as every model shares the image encoder."""
        image = image.convert("RGB")
        key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        if key not in self._features:
            with torch.no_grad():
                pos, neg = self.pipe.encode_image(image, self.device, 1, output_hidden_states=True)
            if len(self._features) > 256:
                self._features.clear()
            self._features[key] = (neg[None], pos[None])
        return self._features[key]


def _load_finetuned(pipe, name: str, path: Path, variant: str, live: dict[str, torch.nn.Parameter]) -> AdapterWeights:
    """Read and check one save_adapter file; its tensors on the pipeline's device and dtype."""
    tensors, meta = read_adapter_file(path)
    unet = pipe.unet
    check_adapter_tensors(tensors, unet, image_encoder_dim=pipe.image_encoder.config.hidden_size,
                          variant=variant, path=path, as_finetuned=True)
    params = official_to_live(tensors)
    if set(params) != set(live):
        raise AdapterFileError(f"{path}: its adapter tensors do not map onto this pipeline's "
                               f"({len(set(live) - set(params))} missing, {len(set(params) - set(live))} extra)")
    for key, value in params.items():
        if value.shape != live[key].shape:
            raise AdapterFileError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(live[key].shape)}")
    params = {k: v.to(device=unet.device, dtype=unet.dtype) for k, v in params.items()}
    block = None
    if variant == "text_aware":
        resampler = unet.encoder_hid_proj.image_projection_layers[0]
        heads = int(meta.get("text_image_attn_heads", resampler.layers[0].attn.heads))
        dim = unet.config.cross_attention_dim
        block = TextImageCrossAttention(dim, dim, heads)
        block.load_state_dict({k[len(BLOCK_PREFIX):]: v for k, v in tensors.items() if k.startswith(BLOCK_PREFIX)},
                              strict=True)
        block = block.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)
    return AdapterWeights(name, variant, str(path), params, block, dict(meta))


def load_models(profile, runs_dir=None, *, extra=None, vae=None, device=None, dtype=None,
                verbose: bool = True) -> ModelBank:
    """The pretrained IP-Adapter Plus and notebook 03's fine-tuned adapters over one shared pipeline.

    profile:  a helpers.profile.Profile (base model, IP-Adapter file, image encoder)
    runs_dir: the folder notebook 03 trained into (its vanilla/ and text_aware/ subfolders hold
              adapter.safetensors); None or missing files: only the pretrained model
    extra:    more models, {name: Hub id "user/name", run folder or adapter file} (helpers.hub.resolve_adapter);
              the variant comes from the file
    vae:      None = profile.base_model's VAE; else a Hub id or folder of an AutoencoderKL
    device, dtype: default cuda + fp16 with a GPU, else cpu + fp32

    A missing or unusable adapter file never raises: the bank records why in `bank.missing` (printed
    once here unless verbose=False) and offers the models it has (always "pretrained").
    """
    from .hub import adapter_variant, resolve_adapter

    clash = sorted(set(extra or {}) & set(MODEL_NAMES))
    if clash:
        raise ValueError(f"extra model names {clash} are taken by the built-in models; choose other names")
    pipe = load_pipeline(profile.base_model, profile.ip_adapter, variant="text_aware",
                         image_encoder=profile.image_encoder, device=device, dtype=dtype, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    unet.requires_grad_(False)
    live = adapter_parameters(unet)
    pretrained = AdapterWeights(PRETRAINED, "vanilla", str(profile.ip_adapter),
                                {k: p.data for k, p in live.items()}, None, {})
    unet.text_image_attn = None  # the zero-initialised block load_pipeline added: unused
    models, missing = {PRETRAINED: pretrained}, {}
    for name, (folder, variant) in FINETUNED.items():
        if runs_dir is None:
            missing[name] = "no runs folder given (notebook 03 writes one)"
            continue
        path = Path(runs_dir) / folder / ADAPTER_FILE
        if not path.is_file():
            missing[name] = (f"no adapter at {path}: train it in notebook 03 (variant {variant!r}), "
                             f"or copy its adapter.safetensors there")
            continue
        try:
            models[name] = _load_finetuned(pipe, name, path, variant, live)
        except (AdapterFileError, KeyError, OSError, RuntimeError, ValueError) as e:
            missing[name] = f"cannot use {path}: {e}"
    for name, spec in (extra or {}).items():
        try:
            path = resolve_adapter(spec)
            models[name] = _load_finetuned(pipe, name, path, adapter_variant(path), live)
        except (AdapterFileError, KeyError, OSError, RuntimeError, ValueError) as e:
            missing[name] = f"cannot use {spec}: {e}"
    bank = ModelBank(pipe, profile, models, missing)
    bank.use(PRETRAINED)
    if verbose and missing:
        print("\n".join(f"{n} is not available: {msg}" for n, msg in missing.items()))
        print(f"Models available: {', '.join(bank.names)}")
    return bank


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


def _as_list(x) -> list:
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
        return {r: _as_list(prompts.get(r, [])) for r in references}
    return {r: list(prompts) for r in references}


def generate(bank: ModelBank, references: dict, prompts, *, models=None, scales=(1.0,), seeds=(0,), steps=None,
             guidance=None, negative_prompt: str = "", batch_size=None, resolution=None,
             progress: bool | Callable[[int, int], None] = True) -> list[Sample]:
    """Images for every model x scale x reference x prompt x seed, in that order.

    references: {id: PIL image}
    prompts:    a prompt or list of prompts for every reference, or {reference id: [prompts]}
    models:     bank names (default: all available); scales: IP-Adapter scales; seeds: one image per seed
    steps, guidance, resolution: default to the profile's (num_inference_steps, guidance_scale, resolution)
    batch_size: images per pipeline call (default pick_batch_size); a call holds one reference's prompts x
                seeds (diffusers repeats one reference's features over a call). Results do not depend on
                it beyond floating-point rounding: every image has its own torch.Generator(seed) on the CPU
    progress:   True for a tqdm bar, False for none, or a callable(done, total)
    """
    from tqdm.auto import tqdm

    if not isinstance(references, dict) or not all(isinstance(v, Image.Image) for v in references.values()):
        raise TypeError("references must be a dict {id: PIL.Image}")
    profile = bank.profile
    steps = int(steps or profile.num_inference_steps)
    guidance = float(profile.guidance_scale if guidance is None else guidance)
    resolution = int(resolution or profile.resolution)
    models = bank.names if models is None else _as_list(models)
    for m in models:
        if m not in bank.models:
            raise KeyError(f"model {m!r} is not available: "
                           f"{bank.missing.get(m, 'unknown name')}; available: {', '.join(bank.names)}")
    table = _prompt_table(references, prompts)
    seeds = [int(s) for s in _as_list(seeds)]
    scales = [float(s) for s in _as_list(scales)]
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
    out, done = [], 0
    for name in models:
        pipe = bank.use(name)
        for scale in scales:
            pipe.set_ip_adapter_scale(scale)
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
                        ).images
                    for (p, s), im in zip(chunk, result):
                        out.append(Sample(im, name, r, p, scale, s, steps, guidance, negative_prompt, resolution,
                                          bank.models[name].variant, profile.name, images[r]))
                    done += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(done, total)
    if bar is not None:
        bar.close()
    return out


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _label(sample: Sample, keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        v = getattr(sample, k)
        parts.append(f"{k} {v:g}" if k in ("scale", "guidance") else f"seed {v}" if k == "seed" else str(v))
    return "\n".join(parts)


def image_grid(samples: list[Sample], rows=("reference", "prompt"), cols=("model", "scale"), *, cell: int | None = None,
               thumbnails: bool = True, label_width: int | None = None, title: str | None = None) -> Image.Image:
    """A labelled grid (PIL image): one row per distinct value of the `rows` settings, one column per
    distinct value of the `cols` settings (in order of first appearance), the reference's thumbnail in the
    first column. Default: references x prompts down, models x scales across.

    cell: side of each square picture in pixels (default: the image size, at least 128 and at most 256).
    The labels are also in `grid.info["rows"]`, `grid.info["cols"]` (lists of strings) and `grid.info["title"]`.
    Raises ValueError if two samples fall in the same cell (add e.g. "seed" to rows or cols).
    """
    if not samples:
        raise ValueError("no samples to lay out")
    rows, cols = tuple(_as_list(rows)), tuple(_as_list(cols))
    for k in rows + cols:
        if k not in SETTING_NAMES:
            raise ValueError(f"unknown setting {k!r}: choose from {SETTING_NAMES}")
    row_keys = list(dict.fromkeys(tuple(getattr(s, k) for k in rows) for s in samples))
    col_keys = list(dict.fromkeys(tuple(getattr(s, k) for k in cols) for s in samples))
    cells: dict[tuple, Sample] = {}
    for s in samples:
        key = (tuple(getattr(s, k) for k in rows), tuple(getattr(s, k) for k in cols))
        if key in cells:
            varying = [k for k in SETTING_NAMES if getattr(s, k) != getattr(cells[key], k)]
            raise ValueError(f"two samples share the cell {key}: they differ in {varying}; add one of those to "
                             "rows or cols, or pass fewer samples")
        cells[key] = s
    cell = cell or max(128, min(256, samples[0].image.width))
    font = _font(max(10, cell // 12))
    line_h = max(12, cell // 10)
    chars = max(12, int(cell / (cell // 12 * 0.55)))  # characters per line in a cell-wide label
    label_width = label_width or cell
    show_ref = thumbnails and "reference" in rows and all(s.reference_image is not None for s in samples)
    first_of_row = {rk: next(s for (r, _), s in cells.items() if r == rk) for rk in row_keys}
    row_labels = [_label(first_of_row[rk], rows) for rk in row_keys]
    col_labels = [_label(next(s for (_, c), s in cells.items() if c == ck), cols) for ck in col_keys]
    wrap = lambda text, width: "\n".join(textwrap.fill(t, width) for t in text.split("\n"))  # noqa: E731
    x0 = label_width + (cell if show_ref else 0)
    width = x0 + cell * len(col_keys)
    title_lines = textwrap.wrap(title, max(12, int(chars * width / cell))) if title else []
    label_lines = max(len(wrap(c, chars).split("\n")) for c in col_labels)
    header = line_h * (len(title_lines) + label_lines) + 8
    grid = Image.new("RGB", (width, header + cell * len(row_keys)), "white")
    draw = ImageDraw.Draw(grid)
    if title_lines:
        draw.multiline_text((4, 2), "\n".join(title_lines), fill="black", font=font, spacing=2)
    top = 4 + line_h * len(title_lines)
    if show_ref:
        draw.text((label_width + 4, top), "reference", fill="black", font=font)
    for j, text in enumerate(col_labels):
        draw.multiline_text((x0 + j * cell + 4, top), wrap(text, chars), fill="black", font=font, spacing=2)
    for i, rk in enumerate(row_keys):
        y = header + i * cell
        draw.multiline_text((4, y + 4), wrap(row_labels[i], int(chars * label_width / cell)), fill="black",
                            font=font, spacing=2)
        if show_ref:
            grid.paste(first_of_row[rk].reference_image.convert("RGB").resize((cell, cell)), (label_width, y))
        for j, ck in enumerate(col_keys):
            s = cells.get((rk, ck))
            if s is not None:
                resample = Image.NEAREST if s.image.width < cell else Image.LANCZOS
                grid.paste(s.image.convert("RGB").resize((cell, cell), resample), (x0 + j * cell, y))
    grid.info.update(rows=row_labels, cols=col_labels, title=title or "")
    return grid


# --------------------------------------------------------------------------------------------------
# Saving with the settings, and reading them back
# --------------------------------------------------------------------------------------------------


def _slug(text: str, n: int = 24) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:n] or "x"


def sample_filename(sample: Sample) -> str:
    """A readable, unique file name: model, reference, scale, seed and a hash of all settings."""
    digest = hashlib.sha1(json.dumps(sample.settings(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{_slug(sample.model)}_{_slug(sample.reference)}_s{sample.scale:g}_seed{sample.seed}_{digest}.png"


def save_samples(samples: Iterable[Sample], out_dir) -> list[Path]:
    """Write each sample as out_dir/<name>.png with its settings in the PNG text chunks (one chunk per
    setting, plus all of them as JSON under "ipa-settings"), and update out_dir/index.json and
    index.csv (one row per file; saving into the same folder again adds rows). Returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {row["file"]: row for row in _read_index(out_dir)}
    paths = []
    for s in samples:
        settings = s.settings()
        info = PngInfo()
        for k, v in settings.items():
            info.add_text(k, str(v))
        info.add_text(SETTINGS_KEY, json.dumps(settings))
        path = out_dir / sample_filename(s)
        s.image.save(path, pnginfo=info)
        index[path.name] = {"file": path.name, **settings}
        paths.append(path)
    rows = list(index.values())
    tmp = out_dir / (INDEX_JSON + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out_dir / INDEX_JSON)
    with open(out_dir / (INDEX_CSV + ".tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", *SETTING_NAMES])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out_dir / (INDEX_CSV + ".tmp"), out_dir / INDEX_CSV)
    return paths


def _read_index(out_dir: Path) -> list[dict]:
    path = out_dir / INDEX_JSON
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to start a new index") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "file" in r for r in rows):
        raise ValueError(f"{path}: expected a list of objects with a 'file' key")
    return rows


def read_settings(path) -> dict:
    """The settings stored in a PNG written by save_samples (types restored: scale float, seed int, ...)."""
    path = Path(path)
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    if SETTINGS_KEY not in text:
        raise ValueError(f"{path}: no '{SETTINGS_KEY}' text chunk: not written by helpers.sampling.save_samples")
    return json.loads(text[SETTINGS_KEY])


def load_saved(out_dir) -> list[Sample]:
    """The samples of a folder written by save_samples, from its index.json (images loaded)."""
    out_dir = Path(out_dir)
    samples = []
    for row in _read_index(out_dir):
        path = out_dir / row["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir / INDEX_JSON} lists {row['file']}, which is not in {out_dir}")
        with Image.open(path) as im:
            image = im.convert("RGB")
        samples.append(Sample(image=image, **{k: row[k] for k in SETTING_NAMES if k in row}))
    return samples


def png_bytes(image: Image.Image) -> bytes:
    """PNG-encoded bytes of an image (for ipywidgets.Image)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Reference images for the gallery and the panel
# --------------------------------------------------------------------------------------------------

GALLERY_PROMPTS = (
    "a cartoon drawing",
    "a cartoon drawing wearing a red hat",
    "a cartoon drawing in space at night",
    "a watercolor painting",
)


def held_out_references(profile, data_dir, n: int = 4) -> tuple[dict[str, Image.Image], str]:
    """Up to n held-out reference images {id: PIL image}, one per near-duplicate group (a mirrored copy is
    not a second reference), from notebook 01's test split in data_dir, and a sentence saying where they
    came from.

    If data_dir holds no prepared data yet, it is prepared here with the call notebooks 01 and 03 make
    (helpers.data.prepare_dataset with the profile's values and DATA_SEED), so the split is the same.
    """
    from . import data as hdata

    data_dir = Path(data_dir)
    try:
        prep = hdata.load_prepared(data_dir)
        where = f"the test split notebook 01 wrote in {data_dir}"
    except FileNotFoundError:
        prep = hdata.prepare_dataset(profile.dataset, data_dir, resolution=profile.resolution,
                                     test_fraction=profile.test_fraction, seed=hdata.DATA_SEED,
                                     captioner=profile.captioner, progress=False)
        where = f"the test split, prepared now in {data_dir} as notebook 01 does (it had not run)"
    test = prep.test
    if len(test) == 0:
        raise ValueError(f"{data_dir}: the test split is empty (test_fraction={prep.info.get('test_fraction')}); "
                         "prepare the data with a test_fraction above 0")
    ids = [str(i) for i in test["id"]]
    groups = test["group"]
    first = list(dict.fromkeys(groups))  # groups in split order
    pick = [first[round(k * (len(first) - 1) / max(1, n - 1))] for k in range(min(n, len(first)))]
    rows = [groups.index(g) for g in dict.fromkeys(pick)]
    refs = {ids[i]: test[i]["image"].convert("RGB") for i in rows}
    return refs, f"{len(refs)} held-out references (one per group) from {where}"
