"""The models this project compares, by name, over one shared pipeline (notebooks 04 and 05).

    pretrained            IP-Adapter Plus as published (profile.ip_adapter), diffusers' vanilla path
    finetuned-vanilla     runs_dir/vanilla/adapter.safetensors     (notebook 03, variant "vanilla")
    finetuned-text-aware  runs_dir/text_aware/adapter.safetensors  (notebook 03, variant "text_aware")

`MODEL_NAMES` is that list, in the order every table and plot uses (`model_order`).

They share one pipeline (`load_models` -> `ModelBank`): one VAE, text encoder, image encoder and base UNet
in memory, a `TextAwareUNet2DConditionModel` whose text-image block is set to None for the vanilla models
(then it is exactly diffusers' UNet). Only the adapter weights differ between models: the Resampler
(~30M parameters in SD 1.5 Plus), the 16 `to_k_ip` / `to_v_ip` pairs (~19M) and, for the text-aware
model, its block. Each model's copy of them stays on the device, and `ModelBank.use(name)` points the
live parameters at that copy (`param.data = tensor`): no copy, no rounding, so a bank model computes
exactly what a standalone `load_pipeline(..., adapter=file)` computes. Three models at fp16 cost the
base pipeline (~3.4 GB: UNet 860M, ViT-H/14 image encoder 632M, text encoder 123M, VAE 84M parameters)
plus ~0.1 GB per adapter (~49M parameters): they fit a T4's 15 GB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .adapter import load_pipeline
from .adapter_file import (
    ADAPTER_FILE,
    BLOCK_PREFIX,
    AdapterFileError,
    adapter_parameters,
    check_adapter_tensors,
    official_to_live,
    read_adapter_file,
)
from .block import TextImageCrossAttention

PRETRAINED = "pretrained"
FINETUNED = {  # model name -> (folder under runs_dir, variant)
    "finetuned-vanilla": ("vanilla", "vanilla"),
    "finetuned-text-aware": ("text_aware", "text_aware"),
}
MODEL_NAMES = (PRETRAINED, *FINETUNED)



def model_order(names) -> list[str]:
    """Distinct names in MODEL_NAMES order, then any others sorted (the order of every table and plot)."""
    names = list(dict.fromkeys(names))
    return [m for m in MODEL_NAMES if m in names] + sorted(m for m in names if m not in MODEL_NAMES)


@dataclass
class AdapterWeights:
    """One model of the bank: its adapter tensors (on the device) and where they came from."""

    name: str
    variant: str  # "vanilla" or "text_aware"
    source: str  # file the weights were read from
    params: dict[str, torch.Tensor] = field(repr=False)  # adapter_parameters(block=False) name -> tensor
    block: TextImageCrossAttention | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict)


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
        self._live = adapter_parameters(pipe.unet, block=False)
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
                         image_encoder=profile.image_encoder, device=device, dtype=dtype, vae=vae,
                         sampler=profile.sampler)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    unet.requires_grad_(False)
    live = adapter_parameters(unet, block=False)
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
