"""How fast helpers.data.features.cache_features encodes images on this machine (images per second).

    python bench/bench_cache.py                         # active profile (tiny without a GPU): end to end
    python bench/bench_cache.py --profile full          # the real models and data (needs the Hub, a GPU)
    python bench/bench_cache.py --real-size --images 8  # SD 1.5 VAE + CLIP text + ViT-H/14 shapes with
                                                        # random weights: real compute, no download

Two figures: end to end (cache_features into an empty folder: loading the models, encoding, writing the
file) and encoding alone (helpers.data.features.encode_batch on already-loaded models, the part that grows with the
data). The issue's target: the 529 Rick and Morty images in under 5 minutes on a T4. Say the machine when
you quote a figure; the script prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from types import SimpleNamespace

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_for(n: int, split):
    """n training images (the split's, repeated as needed) with their captions."""
    rows = [split[i % len(split)] for i in range(n)]
    return [r["image"] for r in rows], [r["text"] for r in rows]


def time_encoding(pipe, images, texts, resolution, batch_size, device) -> float:
    from helpers.data.features import encode_batch

    with torch.no_grad():
        encode_batch(pipe, images[:1], texts[:1], resolution)  # warm-up (kernels, allocator)
        sync(device)
        start = time.perf_counter()
        for s in range(0, len(images), batch_size):
            encode_batch(pipe, images[s:s + batch_size], texts[s:s + batch_size], resolution)
        sync(device)
    return time.perf_counter() - start


def real_size_pipe(device, dtype, tokenizer_folder):
    """The three frozen encoders at their real sizes (random weights): SD 1.5's VAE, CLIP ViT-L/14's text
    encoder, OpenCLIP ViT-H/14 as CLIPVisionModelWithProjection (helpers.model.sd15.VIT_H14)."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from helpers.model.sd15 import VIT_H14

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H14))
    tok = CLIPTokenizer.from_pretrained(tokenizer_folder, model_max_length=77)
    return SimpleNamespace(
        vae=vae.to(device, dtype).eval(), text_encoder=text.to(device, dtype).eval(),
        image_encoder=image.to(device, dtype).eval(), tokenizer=tok,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        image_processor=VaeImageProcessor(vae_scale_factor=8))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--images", type=int, default=None, help="images to encode (default: 529, or 8 with --real-size)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the profile's feature_batch_size")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--real-size", action="store_true", help="real-size random encoders, encoding only")
    args = ap.parse_args(argv)

    from helpers.data.features import cache_features
    from helpers.data.prepare import prepare_dataset
    from helpers.model.pipeline import load_pipeline
    from helpers.profile import get_profile
    from helpers.support.device import default_device_dtype

    profile = get_profile(args.profile)
    device, dtype = default_device_dtype(args.device)
    batch = args.batch_size or profile.feature_batch_size
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare_dataset(profile.dataset, tmp, resolution=profile.resolution, test_fraction=0, progress=False)
        if args.real_size:
            from helpers.tiny.assets import build_tiny_assets

            n = args.images or 8
            images, texts = images_for(n, prep.train)
            images = [im.resize((512, 512)) for im in images]
            pipe = real_size_pipe(device, dtype, build_tiny_assets() / "sd15" / "tokenizer")
            seconds = time_encoding(pipe, images, texts, 512, batch, device)
            print(f"device: {device_name(device)}, {dtype}")
            print(f"real-size encoders (random weights), 512 px, batch {batch}: {n} images in {seconds:.1f} s = "
                  f"{n / seconds:.2f} images/s; 529 images would take {529 / (n / seconds):.0f} s")
            return
        n = args.images or 529
        images, texts = images_for(n, prep.train)
        split = prep.train.select([i % len(prep.train) for i in range(n)])
        start = time.perf_counter()
        cache_features(split, os.path.join(tmp, "cache"), base_model=profile.base_model, ip_adapter=profile.ip_adapter,
                       image_encoder=profile.image_encoder, resolution=profile.resolution, batch_size=batch,
                       device=device, progress=False)
        end_to_end = time.perf_counter() - start
        pipe = load_pipeline(profile.base_model, profile.ip_adapter, image_encoder=profile.image_encoder, device=device)
        encoding = time_encoding(pipe, images, texts, profile.resolution, batch, device)
    print(f"device: {device_name(device)}, {dtype}; profile {profile.name}, {profile.resolution} px, batch {batch}")
    print(f"cache_features end to end: {n} images in {end_to_end:.1f} s = {n / end_to_end:.1f} images/s "
          "(loading models, encoding, writing)")
    print(f"encoding only:             {n} images in {encoding:.1f} s = {n / encoding:.1f} images/s")


if __name__ == "__main__":
    main()
