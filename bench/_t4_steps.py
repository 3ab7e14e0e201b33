"""The pipelines and steps that both the counted budget (t4_budget.py, on fake tensors) and the GPU check
(gpu_check.py, on a real GPU) run: the same code, the same settings, the profile's defaults.

    pipe = profile_pipeline(profile, "text_aware", device="cuda")    # SD 1.5 size, random weights
    unet = profile_unet(profile, "text_aware", device="cuda")          # the UNet alone, as training holds it
    run = training_run(unet, profile, "text_aware", out=tmp, accelerator=Accelerator(mixed_precision="fp16"))
    helpers.train.step.training_step(run, step)                        # the real training step
    latents = pipeline_call(pipe, profile, eval_batch(profile), steps, reference_embeds(pipe, pixels))
    decode(pipe, latents)
    seg = segmenter_model(profile, device="cuda")                      # CLIPSeg (helpers.data.masks), fp16
    probs = segment_call(seg, segmenter_inputs(seg, 8, segmenter_size(profile), device="cuda"), profile.resolution)

Real sizes come from helpers.model.sd15 (bench/_real_size.py (real_size_models) for the UNet with IP-Adapter Plus
and the ViT-H/14 image encoder, bench_train's VAE and text encoder); the tiny profile's models are its own
files, loaded with helpers.model.pipeline.load_pipeline. The segmenter (CLIPSeg) is built from its config files:
the tiny profile's folder, or the published files of CIDAS/clipseg-rd64-refined in rehearsal/hub_files/.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import _common as C
import torch

FULL_TRAIN_IMAGES = 476  # the full profile's training split: 529 drawings less ~10% held out (notebook 03)
FULL_DATASET_ROWS = 529  # every row, train and test: what notebook 01 masks (helpers.data.masks.prepare_masks)
VARIANTS = ("vanilla", "text_aware")
PROMPT = "a cartoon character riding a bicycle"  # one of notebook 05's edit prompts


def sd15_pipeline(profile, variant: str, *, device="cpu", dtype=torch.float16):
    """A StableDiffusionPipeline with IP-Adapter Plus (vanilla or text-aware) at SD 1.5's sizes with random
    weights; device "meta" builds it in well under a second and holds no memory. Sampler: the profile's
    (make_scheduler on SD 1.5's scheduler config). Tokenizer: the tiny profile's (the real vocabulary is a
    download; the text encoder reads 77 positions either way)."""
    from bench_train import real_size_vae_and_text
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    from helpers.model.pipeline import make_scheduler
    from helpers.tiny.assets import SD15_SCHEDULER
    from _real_size import real_size_models
    from helpers.tiny.tokenizer import save_tokenizer

    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
        unet, image_encoder = real_size_models(variant, dtype=dtype, device=device)
        vae, text_encoder = real_size_vae_and_text(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_tokenizer(Path(tmp))
    return StableDiffusionPipeline(
        vae=vae.to(device, dtype), text_encoder=text_encoder.to(device, dtype), tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(SD15_SCHEDULER, profile.scheduler), safety_checker=None,
        feature_extractor=CLIPImageProcessor(), image_encoder=image_encoder, requires_safety_checker=False)


def profile_pipeline(profile, variant: str, *, device="cpu", dtype=torch.float16):
    """The profile's pipeline: sd15_pipeline for the full profile; the tiny profile's own files otherwise."""
    if not profile.random_weights:
        return sd15_pipeline(profile, variant, device=device, dtype=dtype)
    from helpers.model.pipeline import load_pipeline

    pipe = load_pipeline(profile.base_model, profile.ip_adapter, variant=variant, device="cpu",
                         dtype=torch.float32, scheduler=profile.scheduler)
    return pipe.to(device if str(device) != "meta" else "cpu", dtype)


def profile_unet(profile, variant: str, *, device="cpu", dtype=torch.float16):
    """The profile's UNet with IP-Adapter Plus (and the block, text-aware) alone: what training holds on the
    device. Built on the CPU, moved to `device`."""
    if profile.random_weights:
        return profile_pipeline(profile, variant, device=device, dtype=dtype).unet
    from _real_size import real_size_models

    unet, _ = real_size_models(variant, dtype=dtype, device="cpu")  # the image encoder stays behind
    return unet.to(device)


def image_feature_shape(unet) -> tuple[int, int]:
    """(tokens, width) of the image features the UNet's Resampler reads: (257, 1280) for ViT-H/14 at 224 px,
    (17, 32) for the tiny encoder (32 px, patch 8)."""
    from helpers.model.sd15 import VIT_H14
    from helpers.tiny.assets import IMAGE_ENCODER_SIZE

    width = unet.encoder_hid_proj.image_projection_layers[0].proj_in.in_features
    if width == VIT_H14["hidden_size"]:
        return (VIT_H14["image_size"] // VIT_H14["patch_size"]) ** 2 + 1, width
    return (IMAGE_ENCODER_SIZE // 8) ** 2 + 1, width


def training_run(unet, profile, variant: str, *, out: Path, checkpointing: bool = False, accelerator=None,
                 mode=contextlib.nullcontext()):
    """The helpers.train.run.Run that training_step takes, as prepare_run builds it on a T4 (run._model): the
    UNet frozen in fp16 with the adapter's parameters in fp32, AdamW (foreach, torch's choice for CUDA
    parameters) prepared by an fp16 Accelerator, a feature cache of one batch (fp16, as helpers.data.features
    stores it, random finite values). accelerator=None: an Accelerator on the CPU made to run fp16 as it does
    on a GPU (autocast around forward, a GradScaler), for CPU tensors; `mode`: where tensors are made."""
    from helpers.model.official_format import adapter_parameters
    from helpers.model.sd15 import TEXT_LEN
    from helpers.train.config import TrainConfig
    from helpers.train.run import Run

    unet.requires_grad_(False)
    params = adapter_parameters(unet)
    with mode:
        for p in params.values():
            p.data = p.data.float()
            p.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(list(params.values()), lr=profile.learning_rate, weight_decay=profile.weight_decay,
                                  foreach=True)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True, mixed_precision="fp16")
        accelerator.native_amp = True  # what Accelerate sets for fp16 on a GPU: autocast around forward ...
        accelerator.scaler = torch.amp.GradScaler("cpu")  # ... and a GradScaler (for CPU tensors, the CPU one)
    model, optimizer = accelerator.prepare(unet, optimizer, device_placement=[False, False])
    b, latent, text_dim = profile.train_batch_size, profile.resolution // 8, unet.config.cross_attention_dim
    tokens, width = image_feature_shape(unet)
    with mode:
        f16 = dict(dtype=torch.float16)
        feats = {"latent_mean": torch.randn(b, 4, latent, latent, **f16),
                 "latent_std": torch.rand(b, 4, latent, latent, **f16) * 0.1,
                 "text_embeds": torch.randn(b, TEXT_LEN, text_dim, **f16),
                 "null_text_embeds": torch.randn(1, TEXT_LEN, text_dim, **f16),
                 "image_embeds": torch.randn(b, tokens, width, **f16),
                 "null_image_embeds": torch.randn(1, tokens, width, **f16)}
    config = TrainConfig(output_dir=str(out), variant=variant, gradient_checkpointing=checkpointing)
    return Run(config, accelerator, profile, out, feats, b, steps_per_epoch=1, max_steps=10**6, every=10**9,
               model=model, params=params, optimizer=optimizer, scheduler=C.ddpm_scheduler(),
               scaling=C.SD15_SCALING_FACTOR)


def eval_batch(profile) -> int:
    """Images per pipeline call in notebook 05's grid: one reference's prompts x seeds (diffusers repeats one
    reference's features across a call), at most MAX_BATCH (pick_batch_size's cap), or the profile's
    eval_batch_size."""
    from helpers.sample.generate import MAX_BATCH

    per_reference = (1 + profile.eval_edits_per_reference) * len(profile.eval_seeds)
    return int(profile.eval_batch_size or min(MAX_BATCH, per_reference))


def reference_embeds(pipe, pixels: torch.Tensor, guided: bool) -> torch.Tensor:
    """What generate passes as ip_adapter_image_embeds[0] for one reference: bank.image_features' call of
    pipe.encode_image (the reference and a zero image), stacked [negative, positive] when guided.
    pixels: (1, 3, 224, 224), the CLIPImageProcessor's output."""
    pos, neg = pipe.encode_image(pixels, pixels.device, 1, output_hidden_states=True)
    return torch.cat([neg[None], pos[None]]) if guided else pos[None]  # (2 or 1, 1, tokens, width)


def pipeline_call(pipe, profile, batch: int, steps: int, embeds: torch.Tensor, on_step=None) -> torch.Tensor:
    """helpers.sample.generate's pipeline call for `batch` images of one reference (the profile's guidance
    and resolution, a CPU generator per image), stopped before the decode: returns the latents (B, 4, r/8, r/8).
    on_step(): called after every denoising step."""
    guided = profile.guidance_scale > 1
    hook = {} if on_step is None else {"callback_on_step_end": lambda _p, _i, _t, kw: (on_step(), kw)[1]}
    with torch.no_grad():
        return pipe(prompt=[PROMPT] * batch, negative_prompt=[""] * batch if guided else None,
                    ip_adapter_image_embeds=[embeds], num_inference_steps=steps, guidance_scale=profile.guidance_scale,
                    height=profile.resolution, width=profile.resolution,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in range(batch)], output_type="latent",
                    **hook).images


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's own VAE decode (which output_type="latent" skips), one image at a time as generate has
    it on a GPU (vae.enable_slicing). Returns (B, 3, r, r) in [-1, 1]."""
    pipe.vae.enable_slicing()
    with torch.no_grad():
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# The segmenter: CLIPSeg as helpers.data.masks runs it (01's masks, 05's subject scores)
# --------------------------------------------------------------------------------------------------


def segmenter_files(profile) -> Path:
    """The folder of the profile's segmenter's config files: its own folder (the tiny profile's), else the
    published files of its Hub repo kept for the rehearsal mirror (rehearsal/hub_files/ORG--NAME/: config.json,
    preprocessor_config.json), so the count needs no download."""
    name = str(profile.segmenter)
    folder = Path(name) if Path(name).is_dir() else C.ROOT / "rehearsal" / "hub_files" / name.replace("/", "--")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'}: no config for the segmenter {name!r}; copy its Hub repo's "
                                "config.json and preprocessor_config.json there (rehearsal/hub_files/ORG--NAME/)")
    return folder


def segmenter_model(profile, *, device="cpu", dtype=torch.float16):
    """The profile's CLIPSegForImageSegmentation from its config (segmenter_files) with random weights, in eval
    mode, in `dtype` (fp16: load_segmenter's choice on a GPU); device "meta" builds it at once and holds no
    memory. Its attention is transformers' default for it (SDPA), as from_pretrained gives."""
    import json

    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from helpers.tiny.shapes import no_init, random_init

    config = CLIPSegConfig.from_dict(json.loads((segmenter_files(profile) / "config.json").read_text()))
    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext(), no_init():
        model = CLIPSegForImageSegmentation(config)
    if str(device) != "meta":
        random_init(model, 9)
    return model.to(device=device, dtype=dtype).eval()


def segmenter_size(profile) -> int:
    """The side CLIPSeg's processor resizes each image to (preprocessor_config.json's size: 352 for
    CIDAS/clipseg-rd64-refined; the model interpolates its 224 px position embeddings)."""
    import json

    size = json.loads((segmenter_files(profile) / "preprocessor_config.json").read_text())["size"]
    return int(size if isinstance(size, int) else size.get("shortest_edge") or size["height"])


def segmenter_inputs(model, batch: int, size: int, *, text_positions: int | None = None, device="cpu") -> dict:
    """What helpers.data.masks.Segmenter.logits gives the model for `batch` (image, prompt) pairs: pixel_values
    (B, 3, size, size) in the model's dtype, input_ids and attention_mask (B, text_positions), default the text
    tower's 77 positions (the processor pads to a batch's longest prompt: an upper bound for subject words).
    Empty tensors: make them inside the FakeTensorMode to count."""
    dtype = next(model.parameters()).dtype
    n = text_positions or model.config.text_config.max_position_embeddings
    return {"pixel_values": torch.empty(batch, 3, size, size, dtype=dtype, device=device),
            "input_ids": torch.zeros(batch, n, dtype=torch.long, device=device),
            "attention_mask": torch.ones(batch, n, dtype=torch.long, device=device)}


def segment_call(model, inputs: dict, resolution: int) -> torch.Tensor:
    """helpers.data.masks.segment_probabilities' work on the device for one batch: the model's logits (B, S, S),
    their sigmoid in fp32, resized bilinearly to the images' `resolution`. Returns float32 (B, R, R)."""
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(**inputs).logits
        probs = logits.float().reshape(len(inputs["pixel_values"]), *logits.shape[-2:]).sigmoid()
        return F.interpolate(probs[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)[:, 0]
