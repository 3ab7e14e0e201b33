"""A training step from the feature cache versus encoding on the fly, at real SD 1.5 size (random weights),
measured side by side in one process (issue 5, "Speed and memory").

    python bench/bench_train.py                          # cuda + fp16 if there is a GPU, else cpu + fp32
    python bench/bench_train.py --repeats 3 --batch 1    # a few minutes on a 2-core CPU

cached      what helpers.train does: latents sampled from the cached VAE mean/std, cached text states
            (B, 77, 768) and image features (B, 257, 1280) (fp16, as notebook 01's cache holds them); only
            the UNet runs (helpers.train.loss.diffusion_loss, backward, clipping, AdamW).
on-the-fly  what the reference IP-Adapter training script (tutorial_train_plus.py) does in each step: the
            VAE encoder on the 512 x 512 pixels, CLIP ViT-H/14 on the 224 x 224 crop (penultimate hidden
            states) and the CLIP text encoder on the token ids, all frozen under no_grad, then the same
            UNet step. Image decoding, resizing and tokenising happen in the data loader in both cases and
            are not timed; neither is condition dropout (it changes inputs, not cost).

Models at their SD 1.5 sizes, with random weights and no download: bench/_real_size.py (real_size_models) (UNet
860M + IP-Adapter Plus, ViT-H/14 632M), an AutoencoderKL with block_out_channels (128, 256, 512, 512)
and a CLIPTextModel (hidden 768, 12 layers, 12 heads, intermediate 3072, 77 positions). On a GPU the frozen
weights are fp16, the trainable ones fp32 (autocast + GradScaler), and the encoders are moved off the GPU
(untimed) before each cached step, so its peak memory is that of a run that never loads them.

Prints the median step time of each, the speed-up (on-the-fly / cached, median of the per-round paired
ratios), the peak GPU memory of each, and an ESTIMATE (not a measurement) of a full 6-epoch run.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import torch

T4_MEMORY_TARGET_GIB = 13.0


def real_size_vae_and_text(seed: int):
    """SD 1.5's VAE and CLIP ViT-L/14 text encoder shapes, random weights (fast init, helpers.tiny.shapes)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers.tiny.shapes import no_init, random_init

    with no_init():
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
                            scaling_factor=C.SD15_SCALING_FACTOR)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    random_init(vae, seed + 2)
    random_init(text, seed + 3)
    return vae.eval(), text.eval()


def token_ids(batch: int, g: torch.Generator, length: int = 77) -> torch.Tensor:
    """CLIP-tokeniser-shaped ids: <start>, a caption of ~12 tokens, <end>, padded with <end> to 77."""
    ids = torch.full((batch, length), 49407)
    ids[:, 0] = 49406
    ids[:, 1:13] = torch.randint(0, 49406, (batch, 12), generator=g)
    return ids


def main(argv=None):
    C.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="frozen weights (default: fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--variant", default="text_aware", choices=["vanilla", "text_aware"])
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 3 on cpu, 10 on cuda)")
    ap.add_argument("--steps", type=int, default=None,
                    help="consecutive training steps per measurement (default: 1 on cpu, 5 on cuda)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: 1 on cpu, 4 on cuda)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="as helpers.train's option")
    ap.add_argument("--train-images", type=int, default=475, help="for the estimate: ~90%% of the 529 images")
    ap.add_argument("--epochs", type=int, default=6, help="for the estimate")
    ap.add_argument("--no-heap-tuning", action="store_true",
                    help="on a CPU, leave glibc's malloc as it is (default: keep freed memory, fewer page faults)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from helpers.model.sd15 import SD15_UNET, TEXT_LEN
    from _real_size import real_size_models
    from helpers.train.loss import diffusion_loss

    device, dtype = C.pick_device(args.device, args.dtype)
    gpu = device.type == "cuda"
    repeats = args.repeats or (10 if gpu else 3)
    calls = args.steps or (5 if gpu else 1)
    batch = args.batch or (4 if gpu else 1)
    print("bench_train: a training step from the feature cache vs encoding on the fly, real SD 1.5 size, random weights")
    heap = not gpu and not args.no_heap_tuning and C.keep_freed_memory()
    for line in C.machine_lines(device, dtype):
        print(line)
    if not gpu:
        print(f"malloc: {'freed blocks kept in the heap (mallopt; --no-heap-tuning to turn off)' if heap else 'as is'}")
    print(f"settings: variant {args.variant}, batch {batch}, 512 px, {repeats} interleaved rounds, {calls} step(s) per "
          f"measurement, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")

    t0 = time.perf_counter()
    unet, image_encoder = real_size_models(args.variant, dtype=dtype, device=device, seed=args.seed)
    vae, text_encoder = real_size_vae_and_text(args.seed)
    vae, text_encoder = vae.to(device, dtype), text_encoder.to(device, dtype)
    encoders = [vae, image_encoder, text_encoder]
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6
              for name, m in [("UNet+adapter", unet), ("VAE", vae), ("ViT-H/14", image_encoder), ("text", text_encoder)]}
    print(f"built in {time.perf_counter() - t0:.0f} s: " + ", ".join(f"{k} {v:.0f}M" for k, v in counts.items()))

    params = C.make_trainable(unet, device, dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    steppers = {"cached": C.AdapterStep(params, device, dtype), "on-the-fly": C.AdapterStep(params, device, dtype)}
    scheduler = C.ddpm_scheduler()

    # the data loader's output for one batch (on the device, untimed in both cases)
    g = torch.Generator().manual_seed(args.seed)
    pixels = (torch.rand(batch, 3, 512, 512, generator=g) * 2 - 1).to(device, dtype)  # VaeImageProcessor: [-1, 1]
    clip_pixels = torch.randn(batch, 3, 224, 224, generator=g).to(device, dtype)  # CLIPImageProcessor: normalised
    ids = token_ids(batch, g).to(device)

    @torch.no_grad()
    def encode():
        dist = vae.encode(pixels).latent_dist
        return {"latent_mean": dist.mean, "latent_std": dist.std,
                "image_embeds": image_encoder(clip_pixels, output_hidden_states=True).hidden_states[-2],
                "text_embeds": text_encoder(ids)[0]}

    # the feature cache for this batch: the encoders' own outputs, stored fp16 (as cache_features writes them)
    cache = {k: v.to(torch.float16) for k, v in encode().items()}
    assert cache["image_embeds"].shape == (batch, 257, 1280) and cache["text_embeds"].shape == (batch, TEXT_LEN, 768)
    assert cache["latent_mean"].shape == (batch, 4, SD15_UNET["sample_size"], SD15_UNET["sample_size"])
    rounds = {"cached": 0, "on-the-fly": 0}

    def step(variant):
        def run():
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rounds[variant])  # same noise per round
            rounds[variant] += 1
            if variant == "cached":
                return steppers[variant](lambda: diffusion_loss(unet, scheduler, cache, gen, C.SD15_SCALING_FACTOR))

            def loss():  # the reference script: latent_dist.sample() * 0.18215 == (mean + std * eps) * 0.18215
                return diffusion_loss(unet, scheduler, encode(), gen, C.SD15_SCALING_FACTOR)
            return steppers[variant](loss)
        return run

    def place(variant):  # on a GPU the cached run holds no encoder in GPU memory
        if gpu:
            for m in encoders:
                m.to("cpu" if variant == "cached" else device)
            torch.cuda.empty_cache()

    print()
    times, peaks, cpu = C.interleaved({"cached": step("cached"), "on-the-fly": step("on-the-fly")}, device,
                                 repeats=repeats, calls=calls, before=place, progress="training")
    lines, _ = C.ratio_table(f"\nseconds per training step, batch {batch} ({args.variant}):", times, "cached",
                             peaks=peaks, cpu=None if gpu else cpu)
    print("\n".join(lines))
    speedup = [1 / r for r in C.paired_ratios(times, "cached", "on-the-fly")]
    print(f"speed-up of the cache (on-the-fly / cached): {C.median(speedup):.2f}x "
          f"(per-round {min(speedup):.2f}-{max(speedup):.2f}), measured side by side on "
          f"{'this GPU' if gpu else 'this CPU'}")
    if not gpu:
        cpu_speedup = [1 / r for r in C.paired_ratios(cpu, "cached", "on-the-fly")]
        print(f"  the same in process CPU time (less sensitive to other jobs): {C.median(cpu_speedup):.2f}x "
              f"(per-round {min(cpu_speedup):.2f}-{max(cpu_speedup):.2f})")
    if gpu:
        ok = peaks["cached"] <= T4_MEMORY_TARGET_GIB
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): cached {peaks['cached']:.2f} GiB, on-the-fly "
              f"{peaks['on-the-fly']:.2f} GiB; T4 target for the cached run <= {T4_MEMORY_TARGET_GIB:.0f} GiB: "
              f"{'pass' if ok else 'FAIL'} (allocated on this GPU; a T4 adds the CUDA context and allocator slack)")
    print()
    print("\n".join(C.run_estimate_lines({k: C.median(v) for k, v in times.items()}, batch=batch,
                                         train_images=args.train_images, epochs=args.epochs, device=device)))
    print(f"\nload avg at end: {C.load_average()}")


if __name__ == "__main__":
    main()
