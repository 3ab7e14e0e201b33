"""Load Stable Diffusion 1.5 with IP-Adapter Plus, vanilla or text-aware: the project's entry point.

    pipe = load_pipeline(base_model, ip_adapter, variant="vanilla" | "text_aware", adapter=None, ...)
    unet = load_unet(...)               # the UNet alone with the adapter, for training from cached features
    save_adapter(pipe, path)            # helpers.model.adapter_file

Both load the same way, in the same steps (`_adapter_weights`, `_attach_adapter`): find the IP-Adapter file
and the fine-tuned weights, read and check them against the UNet, attach them with diffusers' own loader, and
for text-aware add the block. Vanilla is diffusers' own IP-Adapter path, untouched; text-aware uses
`TextAwareUNet2DConditionModel` (helpers.model.block): the same UNet plus the text-image block on the image
tokens. The pipeline samples with the profile's scheduler (DDIM by default: `make_scheduler`), and on a GPU
loads the base model's fp16 weight files where it has them (helpers.support.loading.fp16_first). Every load goes
through helpers.support.loading, so a wrong or unreachable id fails with a message that names it.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import UNet2DConditionModel

from ..support.compat import dtype_kwargs, load_ip_adapter_weights
from ..support.device import default_device_dtype
from ..support.loading import fp16_first, loading
from ..support.locations import image_encoder_next_to, split_hub_file, split_hub_name
from .adapter_file import (
    check_adapter_tensors,
    read_adapter_file,
    resolve_adapter,
    text_image_block,
)
from .block import TextAwareUNet2DConditionModel
from .official_format import split_official
from .sd15 import DEFAULT_SCHEDULER

VARIANTS = ("vanilla", "text_aware")


def resolve_ip_adapter(ip_adapter: str | os.PathLike) -> Path:
    """Local path of an official IP-Adapter file: a local file, or 'hub_id/subfolder/weight_name' downloaded
    with `hf_hub_download` (offline: read from the Hub cache)."""
    path = Path(ip_adapter).expanduser()
    if path.is_file():
        return path
    repo, sub, name = split_hub_file(ip_adapter)
    from huggingface_hub import hf_hub_download

    with loading("IP-Adapter file", ip_adapter):
        return Path(hf_hub_download(repo, name, subfolder=sub or None))


def load_image_encoder(spec, dtype):
    """A CLIPVisionModelWithProjection from a local folder or 'hub_id/subfolder' (fp16 files first on a GPU)."""
    from transformers import CLIPVisionModelWithProjection

    if Path(str(spec)).expanduser().is_dir():
        repo, sub = str(spec), ""
    else:
        hub = split_hub_name(spec)
        if hub is None:
            raise ValueError(f"image encoder {spec!r}: neither an existing local folder nor 'hub_owner/repo/subfolder'")
        repo, sub = hub
    with loading("image encoder (a CLIPVisionModelWithProjection)", spec):
        encoder, _ = fp16_first(lambda **v: CLIPVisionModelWithProjection.from_pretrained(
            repo, subfolder=sub, dtype=dtype, **v), dtype, source=repo)
    return encoder


def load_vae(spec, dtype=None):
    """An AutoencoderKL from a Hub id (e.g. 'stabilityai/sd-vae-ft-mse'), a VAE folder, or a pipeline folder
    (its vae/ subfolder); an AutoencoderKL instance is returned as is."""
    from diffusers import AutoencoderKL

    if isinstance(spec, AutoencoderKL):
        return spec
    sub = "vae" if (Path(spec) / "vae").is_dir() else None
    kwargs = dtype_kwargs(dtype) if dtype is not None else {}
    with loading("VAE (an AutoencoderKL: a Hub id such as stabilityai/sd-vae-ft-mse, or a folder)", spec):
        vae, _ = fp16_first(lambda **v: AutoencoderKL.from_pretrained(str(spec), subfolder=sub, **kwargs, **v), dtype,
                            source=spec)
    return vae


def make_scheduler(config, name: str | None = DEFAULT_SCHEDULER):
    """The sampler `name` (a diffusers scheduler class name, e.g. "DDIMScheduler"), built from a base model's
    scheduler config, or None for a scheduler of the config's own class.

    `from_config` keeps the base model's training schedule: SD 1.5 ships a PNDM config with scaled_linear
    betas 0.00085 to 0.012, `steps_offset=1`, `set_alpha_to_one=False` and `clip_sample=False`, which is
    exactly the DDIM set-up of the IP-Adapter paper's code; DDIM's "leading" timestep spacing is its default
    and the one SD 1.5 was sampled with (diffusers recommends "trailing" only together with zero-terminal-SNR
    betas, for models fine-tuned that way).
    """
    import diffusers

    if name is None:
        name = config["_class_name"]
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler class: use e.g. 'DDIMScheduler', "
                         "'DPMSolverMultistepScheduler' or 'EulerDiscreteScheduler'")
    return cls.from_config(config)


def _adapter_weights(ip_adapter, adapter, variant: str):
    """Step 1 of both loaders: (weights file, its tensors, its metadata). The fine-tuned `adapter` when given
    (a file, a run folder or a Hub id), else the official `ip_adapter` file."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    path = resolve_adapter(adapter) if adapter is not None else resolve_ip_adapter(ip_adapter)
    tensors, meta = read_adapter_file(path)
    return path, tensors, meta


def _attach_adapter(unet, tensors, meta, *, variant: str, path, as_finetuned: bool, image_encoder_dim: int, attach):
    """Step 2 of both loaders: check the tensors against the UNet, attach them with diffusers' own loader
    (`attach`: pipe.load_ip_adapter, or the same call on a lone UNet), and add the text-image block."""
    check_adapter_tensors(tensors, unet, image_encoder_dim=image_encoder_dim, variant=variant, path=path,
                          as_finetuned=as_finetuned)
    attach(split_official(tensors))
    if variant == "text_aware":
        unet.text_image_attn = text_image_block(tensors, meta, unet)


def load_pipeline(base_model, ip_adapter, *, variant="vanilla", adapter=None, image_encoder=None, device=None,
                  dtype=None, vae=None, scheduler: str | None = DEFAULT_SCHEDULER):
    """A diffusers StableDiffusionPipeline with IP-Adapter Plus loaded, vanilla or text-aware.

    base_model:    Hub id or local folder of a StableDiffusionPipeline
    ip_adapter:    an official-format IP-Adapter Plus file (local path) or "hub_id/subfolder/weight_name"
    variant:       "vanilla" (diffusers' own path) or "text_aware" (plus the text-image block)
    adapter:       fine-tuned weights written by save_adapter, replacing ip_adapter's: a file, a folder holding
                   adapter.safetensors, or a Hub repo id "user/name" (helpers.model.adapter_file.resolve_adapter)
    image_encoder: Hub id/subfolder or local folder; None = the image_encoder folder next to ip_adapter
    device, dtype: default cuda + fp16 with a GPU, else cpu + fp32; with fp16 the base model's fp16 weight
                   files are read where it has them (variant="fp16"), else its default files
    vae:           None = base_model's; else a Hub id or folder of an AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse)
    scheduler:     the sampler, a diffusers scheduler class name (default DDIMScheduler, the profile's), built
                   from base_model's scheduler config (make_scheduler); None = base_model's own

    `pipe(prompt, ip_adapter_image=...)` and `pipe.set_ip_adapter_scale(...)` work as in diffusers. The
    safety checker is not loaded (research on cartoon drawings; it blacks out false positives).
    """
    from diffusers import StableDiffusionPipeline

    path, tensors, meta = _adapter_weights(ip_adapter, adapter, variant)
    device, dtype = default_device_dtype(device, dtype)
    base_model = str(base_model)
    encoder = load_image_encoder(image_encoder if image_encoder is not None else
                                 "/".join(p for p in image_encoder_next_to(ip_adapter) if p), dtype)
    kwargs = {"vae": load_vae(vae, dtype)} if vae is not None else {}
    with loading("base model (a Stable Diffusion 1.5 pipeline)", base_model):
        if variant == "text_aware":
            kwargs["unet"], _ = fp16_first(lambda **v: TextAwareUNet2DConditionModel.from_pretrained(
                base_model, subfolder="unet", **dtype_kwargs(dtype), **v), dtype, source=base_model)
        pipe, weights_variant = fp16_first(lambda **v: StableDiffusionPipeline.from_pretrained(
            base_model, safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
            **dtype_kwargs(dtype), **kwargs, **v), dtype, source=base_model)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(pipe.scheduler.config, scheduler)
    _attach_adapter(pipe.unet, tensors, meta, variant=variant, path=path, as_finetuned=adapter is not None,
                    image_encoder_dim=encoder.config.hidden_size,
                    attach=lambda sd: pipe.load_ip_adapter(sd, subfolder="", weight_name="", image_encoder_folder=None))
    pipe.to(device)
    pipe.adapter_info = {"variant": variant, "weights": str(path), "base_weights": weights_variant, **meta}
    return pipe


def load_unet(base_model, ip_adapter, *, variant="vanilla", adapter=None, image_encoder_dim: int, device=None,
              dtype=None):
    """The UNet alone with the adapter attached: what training from cached features needs (no VAE, no
    text or image encoder in memory). Same modules and weights as `load_pipeline(...).unet` (tested);
    the adapter is attached by the call `pipe.load_ip_adapter` makes (helpers.support.compat.load_ip_adapter_weights).
    image_encoder_dim: width of the image features the Resampler reads (1280 for ViT-H/14)."""
    path, tensors, meta = _adapter_weights(ip_adapter, adapter, variant)
    device, dtype = default_device_dtype(device, dtype)
    cls = TextAwareUNet2DConditionModel if variant == "text_aware" else UNet2DConditionModel
    with loading("base model's UNet", str(base_model)):
        unet, weights_variant = fp16_first(lambda **v: cls.from_pretrained(
            str(base_model), subfolder="unet", **dtype_kwargs(dtype), **v), dtype, source=base_model)
    _attach_adapter(unet, tensors, meta, variant=variant, path=path, as_finetuned=adapter is not None,
                    image_encoder_dim=image_encoder_dim, attach=lambda sd: load_ip_adapter_weights(unet, sd))
    unet.adapter_info = {"variant": variant, "weights": str(path), "base_weights": weights_variant, **meta}
    return unet.to(device=device)  # loaded in dtype already: a dtype here makes diffusers warn about fp32 modules
