"""Load Stable Diffusion 1.5 with IP-Adapter Plus, vanilla or text-aware: the project's entry point.

    pipe = load_pipeline(base_model, ip_adapter, variant="vanilla" | "text_aware", adapter=None, ...)
    save_adapter(pipe, path)            # re-exported from helpers.adapter_file
    unet = load_unet(...)               # the UNet alone with the adapter, for training from cached features

Vanilla is diffusers' own IP-Adapter path, untouched. Text-aware uses `TextAwareUNet2DConditionModel`
(helpers.block): the same UNet plus the text-image block on the image tokens. The file format and its
checks live in helpers.adapter_file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from .adapter_file import (  # noqa: F401  (save_adapter, AdapterFileError: public here, see DESIGN.md)
    BLOCK_PREFIX,
    AdapterFileError,
    check_adapter_tensors,
    read_adapter_file,
    save_adapter,
    split_official,
)
from .block import TextAwareUNet2DConditionModel, TextImageCrossAttention
from .compat import dtype_kwargs, load_ip_adapter_weights
from .profile import SAMPLER

VARIANTS = ("vanilla", "text_aware")


def _split_hub_path(spec: str, min_parts: int) -> tuple[str, str, str]:
    """'owner/repo/sub/folder/name' -> ('owner/repo', 'sub/folder', 'name')."""
    parts = spec.strip("/").split("/")
    if len(parts) < min_parts:
        raise ValueError(f"{spec!r} is neither an existing local path nor 'hub_owner/repo/subfolder/file'")
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


def resolve_ip_adapter(ip_adapter: str | os.PathLike) -> tuple[Path, str | tuple[str, str]]:
    """Local path of an IP-Adapter file, and where its image encoder lies by default (a local folder,
    or (hub repo, subfolder)). Accepts a local file or 'hub_id/subfolder/weight_name'."""
    p = Path(ip_adapter)
    if p.is_file():
        return p, str(p.parent / "image_encoder")
    from huggingface_hub import hf_hub_download

    repo, sub, name = _split_hub_path(str(ip_adapter), 3)
    local = hf_hub_download(repo, name, subfolder=sub or None)
    return Path(local), (repo, f"{sub}/image_encoder" if sub else "image_encoder")


def _load_image_encoder(spec, dtype):
    from transformers import CLIPVisionModelWithProjection

    if isinstance(spec, tuple):
        repo, sub = spec
    elif Path(spec).is_dir():
        repo, sub = str(spec), None
    else:
        repo, sub, name = _split_hub_path(str(spec), 3)
        sub = f"{sub}/{name}" if sub else name
    try:
        return CLIPVisionModelWithProjection.from_pretrained(repo, subfolder=sub or "", dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(f"image encoder {spec}: could not load a CLIPVisionModelWithProjection ({e})") from None


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """cuda + fp16 when a GPU is present (a T4 has no native bf16), else cpu + fp32."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def set_sampler(pipe, sampler: str | None):
    """Replace pipe's scheduler by diffusers' `<sampler>Scheduler` built from the base model's own scheduler
    config (its betas, steps_offset, ...). None keeps the base model's (PNDM for SD 1.5)."""
    import diffusers

    if sampler is None:
        return pipe
    cls = getattr(diffusers, f"{sampler}Scheduler", None)
    if cls is None:
        raise ValueError(f"unknown sampler {sampler!r}: give a diffusers scheduler name without 'Scheduler', e.g. "
                         "DDIM, PNDM, EulerDiscrete, DPMSolverMultistep")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def load_pipeline(base_model, ip_adapter, *, variant="vanilla", adapter=None, image_encoder=None, device=None,
                  dtype=None, vae=None, sampler=SAMPLER):
    """A diffusers StableDiffusionPipeline with IP-Adapter Plus loaded, vanilla or text-aware.

    base_model:    Hub id or local folder of a StableDiffusionPipeline
    ip_adapter:    an official-format IP-Adapter Plus file (local path) or "hub_id/subfolder/weight_name"
    variant:       "vanilla" (diffusers' own path) or "text_aware" (plus the text-image block)
    adapter:       fine-tuned weights written by save_adapter, replacing ip_adapter's: a file, a folder holding
                   adapter.safetensors, or a Hub repo id "user/name" (helpers.hub.resolve_adapter)
    image_encoder: Hub id/subfolder or local folder; None = the image_encoder folder next to ip_adapter
    device, dtype: default cuda + fp16 with a GPU, else cpu + fp32
    vae:           None = base_model's; else a Hub id or folder of an AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse)
    sampler:       the scheduler to sample with (set_sampler): the profile's DDIM by default; None keeps
                   base_model's own (SD 1.5 ships PNDM)

    `pipe(prompt, ip_adapter_image=...)` and `pipe.set_ip_adapter_scale(...)` work as in diffusers. The
    safety checker is not loaded (research on cartoon drawings; it blacks out false positives).
    """
    from diffusers import StableDiffusionPipeline

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    from .hub import load_vae, resolve_adapter

    device, dtype = default_device_dtype(device, dtype)
    ip_path, encoder_default = resolve_ip_adapter(ip_adapter)
    weights_path = resolve_adapter(adapter) if adapter is not None else ip_path
    tensors, meta = read_adapter_file(weights_path)
    encoder = _load_image_encoder(image_encoder if image_encoder is not None else encoder_default, dtype)
    unet = None
    if variant == "text_aware":
        unet = TextAwareUNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **dtype_kwargs(dtype))
    kwargs = {"unet": unet} if unet is not None else {}
    if vae is not None:
        kwargs["vae"] = load_vae(vae, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        base_model, safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
        **dtype_kwargs(dtype), **kwargs)
    check_adapter_tensors(tensors, pipe.unet, image_encoder_dim=encoder.config.hidden_size, variant=variant,
                          path=weights_path, as_finetuned=adapter is not None)
    pipe.load_ip_adapter(split_official(tensors), subfolder="", weight_name="", image_encoder_folder=None)
    if variant == "text_aware":
        _attach_block(pipe.unet, tensors, meta)
    set_sampler(pipe, sampler)
    pipe.to(device)
    pipe.adapter_info = {"variant": variant, "weights": str(weights_path), **meta}
    return pipe


def _attach_block(unet, tensors, meta) -> TextImageCrossAttention:
    """Add the text-image block (as many heads as the Resampler: 12 for SD 1.5 Plus) with the file's
    weights, or zero-initialised when the file has none."""
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    block = unet.add_text_image_attn(int(meta.get("text_image_attn_heads", resampler.layers[0].attn.heads)))
    block_sd = {k[len(BLOCK_PREFIX):]: v for k, v in tensors.items() if k.startswith(BLOCK_PREFIX)}
    if block_sd:
        block.load_state_dict(block_sd, strict=True)
    return block


def load_unet(base_model, ip_adapter, *, variant="vanilla", adapter=None, image_encoder_dim: int, device=None,
              dtype=None):
    """The UNet alone with the adapter attached: what training from cached features needs (no VAE, no
    text or image encoder in memory). Same modules and weights as `load_pipeline(...).unet` (tested);
    the adapter is attached by the call `pipe.load_ip_adapter` makes (helpers.compat.load_ip_adapter_weights).
    image_encoder_dim: width of the image features the Resampler reads (1280 for ViT-H/14)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    from .hub import resolve_adapter

    device, dtype = default_device_dtype(device, dtype)
    weights_path = resolve_adapter(adapter) if adapter is not None else resolve_ip_adapter(ip_adapter)[0]
    tensors, meta = read_adapter_file(weights_path)
    cls = TextAwareUNet2DConditionModel if variant == "text_aware" else UNet2DConditionModel
    unet = cls.from_pretrained(base_model, subfolder="unet", **dtype_kwargs(dtype))
    check_adapter_tensors(tensors, unet, image_encoder_dim=image_encoder_dim, variant=variant, path=weights_path,
                          as_finetuned=adapter is not None)
    load_ip_adapter_weights(unet, split_official(tensors))
    if variant == "text_aware":
        _attach_block(unet, tensors, meta)
    unet.adapter_info = {"variant": variant, "weights": str(weights_path), **meta}
    return unet.to(device=device, dtype=dtype)
