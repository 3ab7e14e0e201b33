"""Tiny, random-weight stand-ins for every model and dataset of the `full` profile, built offline.

The `tiny` profile runs the same code paths as `full` (Stable Diffusion 1.5 + IP-Adapter Plus) with
small random models, so the notebooks and tests run on a CPU without the Hugging Face Hub. Nothing
here is trained: every picture and score that comes out of these models is noise with the right shape.

What `build_tiny_assets()` writes, once, into a cache folder (atomically; a finished folder is reused):

    sd15/                      StableDiffusionPipeline.save_pretrained(): a UNet with SD 1.5's block layout
                               (3 x CrossAttnDownBlock2D + DownBlock2D, layers_per_block=2, so 16 cross-
                               attention layers and official IP-Adapter keys 1, 3, ..., 31), VAE, CLIP text
                               encoder and tokenizer, CLIPImageProcessor, and SD 1.5's own scheduler config
                               (PNDM, steps_offset 1, skip_prk_steps: the sampler is the profile's choice)
    ip_adapter/ip-adapter-plus_tiny.safetensors
                               an IP-Adapter Plus checkpoint in the official file format
                               (image_proj.* Resampler with dim_head 64 and depth 4, ip_adapter.{k}.to_{k,v}_ip)
    ip_adapter/image_encoder/  CLIPVisionModelWithProjection (Plus reads its penultimate hidden states)
    clip/                      CLIPModel + tokenizer + processor, for CLIP-T / CLIP-I
    dino/                      ViTModel + image processor, for DINO similarity
    clipseg/                   CLIPSegForImageSegmentation + tokenizer + image processor file, laid out as
                               CIDAS/clipseg-rd64-refined (refined decoder, patch 16, a processor size other
                               than the vision config's, so position embeddings are interpolated as there)
    dataset/                   synthetic "cartoon characters" with captions and mirrored copies, stored as
                               the Hub dataset is (parquet under data/, columns image and text)

Every model loads through the real loaders (`from_pretrained(..., local_files_only=True)`,
`load_ip_adapter`, `datasets.load_dataset`), exactly as the Hub models do in the `full` profile.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cartoons import build_cartoon_dataset
from .shapes import random_ip_adapter_plus
from .tokenizer import save_tokenizer

TINY_VERSION = "v3"  # bump when anything below changes, so caches are rebuilt  (v3: clipseg/)

# Sizes, chosen to keep the layout of the real models while staying fast on a CPU.
TEXT_DIM = 32  # text encoder width = UNet cross_attention_dim (768 in SD 1.5)
IMAGE_ENCODER_DIM = 32  # CLIP vision width (1280 in ViT-H/14)
IMAGE_ENCODER_SIZE = 32  # CLIP vision input size (224)
TINY_RESAMPLER_DIM = 128  # Resampler width; diffusers' converter needs heads = dim / 64 (768 -> 12 heads)
RESAMPLER_QUERIES = 16  # image tokens per reference, as in IP-Adapter Plus
RESOLUTION = 64  # pixels (512 in the full profile); latents are RESOLUTION / 8
IP_ADAPTER_FILE = "ip-adapter-plus_tiny.safetensors"
SEGMENTER_SIZE = 48  # CLIPSeg's processor size (352; its vision config says 224, positions are interpolated)


def default_cache_dir() -> Path:
    """Where tiny assets live: $IPA_TINY_CACHE, else ~/.cache/ipa-text-aware."""
    root = os.environ.get("IPA_TINY_CACHE") or Path.home() / ".cache" / "ipa-text-aware"
    return Path(root) / f"tiny-{TINY_VERSION}"


def build_tiny_assets(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build every tiny asset once (deterministic, no network) and return the folder that holds them.

    A complete folder is reused as is. The folder is built under a temporary name and renamed when
    complete, so an interrupted build never leaves a half-written cache behind.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        _build_sd15(tmp / "sd15")
        _build_ip_adapter(tmp / "ip_adapter")
        _build_clip(tmp / "clip")
        _build_dino(tmp / "dino")
        _build_clipseg(tmp / "clipseg")
        build_cartoon_dataset(tmp / "dataset")
        (tmp / "COMPLETE").write_text(f"tiny assets {TINY_VERSION}: random weights, for tests only\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def tiny_unet_config() -> dict:
    """SD 1.5's UNet layout with tiny widths (real: 320/640/1280/1280, cross_attention_dim 768)."""
    return dict(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def _build_sd15(folder: Path):
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        scaling_factor=0.18215,
    )
    tok = save_tokenizer(folder / "tokenizer")
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("_class_name", "clip_sample")})
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_ENCODER_SIZE}, crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE}
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=feature_extractor, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))


# stable-diffusion-v1-5/stable-diffusion-v1-5's scheduler/scheduler_config.json (less its _diffusers_version):
# PNDM, which the pipeline uses unless told otherwise; clip_sample is there for other schedulers built from it
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def _tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=IMAGE_ENCODER_DIM, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_ENCODER_SIZE, patch_size=8, projection_dim=16,
    )


def _build_ip_adapter(folder: Path):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(4)
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(folder / "image_encoder")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder.parent / "sd15", subfolder="unet", local_files_only=True)
    sd = random_ip_adapter_plus(unet, image_encoder_dim=IMAGE_ENCODER_DIM, dim=TINY_RESAMPLER_DIM,
                                queries=RESAMPLER_QUERIES, seed=3)
    save_file(sd, folder / IP_ADAPTER_FILE)


def _build_clip(folder: Path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
    )

    tok = save_tokenizer(folder)
    torch.manual_seed(5)
    text = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=_tiny_vision_config().to_dict(), projection_dim=16))
    model.save_pretrained(folder)
    proc = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_ENCODER_SIZE}, crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE}
    )
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)


def _build_dino(folder: Path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(6)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def _build_clipseg(folder: Path):
    """A tiny CLIPSegForImageSegmentation in CIDAS/clipseg-rd64-refined's file layout: config.json and
    model.safetensors, the CLIP tokenizer files, and preprocessor_config.json in the Hub's legacy form (resize to
    a square, bilinear, ImageNet mean and std), which helpers.data.masks reads with ViTImageProcessorPil."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    tok = save_tokenizer(folder)
    torch.manual_seed(7)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                  patch_size=16)  # the real patch: the refined decoder upsamples by (16 / 4)^2
    config = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16, extract_layers=[1, 2, 3],
                           reduce_dim=16, decoder_num_attention_heads=4, decoder_intermediate_size=32,
                           use_complex_transposed_convolution=True)
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "processor_class": "CLIPSegProcessor",
        "resample": 2, "size": SEGMENTER_SIZE}, indent=2))


# --------------------------------------------------------------------------------------------------
# Synthetic dataset: procedurally drawn cartoon characters in poses and scenes, with captions, and a
# horizontally mirrored copy of every drawing (as in Norod78/RickAndMorty-HorizontalMirror-blip-captions).
# --------------------------------------------------------------------------------------------------
