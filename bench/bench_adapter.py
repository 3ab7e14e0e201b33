"""Text-aware vs vanilla IP-Adapter Plus at real SD 1.5 size (random weights): cost of a denoising step and
of a training step, measured side by side in one process (issue 3, "Speed").

    python bench/bench_adapter.py                          # cuda + fp16 if there is a GPU, else cpu + fp32
    python bench/bench_adapter.py --repeats 3 --batch 1    # a few minutes on a 2-core CPU
    python bench/bench_adapter.py --only sampling          # or: --only training

One model is built (helpers.tiny.shapes.real_size_models: the 860M-parameter SD 1.5 UNet, a random IP-Adapter
Plus loaded by diffusers' own loader, ViT-H/14 for the image features) and the text-image block is attached
once; the two variants are the same model with the block detached (`unet.text_image_attn = None`, diffusers'
stock path) and attached, so every other weight and every input is identical.

(a) Sampling: one UNet call with classifier-free guidance as the pipeline makes it, batch 2 = [uncond, cond]
    rows, 512 px (64 x 64 latents), text states (2, 77, 768), image features (2, 1, 257, 1280); the call
    includes process_encoder_hidden_states (Resampler, and the block when attached). Target: text-aware
    <= 1.03x vanilla.
(b) Training: one helpers.train step (helpers.train.loss.diffusion_loss, backward to the adapter's parameters
    only, gradient clipping, AdamW) at --batch; frozen UNet in the run's dtype, trainable parameters in fp32
    (autocast + GradScaler with fp16, as Accelerate does). Target: text-aware <= 1.05x vanilla.

Two figures for each target:
- full step: whole calls/steps interleaved (A B B A ...) over --repeats rounds, each measurement the mean
  over --steps consecutive calls; medians and the median of the per-round paired ratios. "noisy" when the
  rounds fall on both sides of the target and spread more than twice its margin: on a shared CPU one
  round's noise (10-30%) dwarfs a 3% target, and a few rounds of 15 s cannot average it out.
- differing part: the only code in which the variants differ (process_encoder_hidden_states for sampling;
  the adapter's forward, backward, clipping and AdamW for training), timed alone over many interleaved
  rounds, as a fraction of the full vanilla step: 1 + extra / vanilla. Valid because the rest of the step is
  the same code on inputs of the same shape. Resolves small overheads where the full step cannot.
On a CPU the process CPU time is shown beside the wall time. Quote the machine lines with the figures.
"""

from __future__ import annotations

import argparse
import gc
import time

import _common as C
import torch

TARGETS = {"sampling": 1.03, "training": 1.05}


def main(argv=None):
    C.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="frozen weights (default: fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 3 on cpu, 10 on cuda)")
    ap.add_argument("--steps", type=int, default=None,
                    help="consecutive calls per measurement (default: 1 on cpu, 10 on cuda)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: 1 on cpu, 4 on cuda)")
    ap.add_argument("--only", choices=["sampling", "training"], default=None, help="run one part only")
    ap.add_argument("--no-heap-tuning", action="store_true",
                    help="on a CPU, leave glibc's malloc as it is (default: keep freed memory, fewer page faults)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from helpers.model.sd15 import RESAMPLER_DIM, SD15_UNET, TEXT_LEN
    from helpers.tiny.shapes import real_size_models
    from helpers.train.loss import diffusion_loss

    device, dtype = C.pick_device(args.device, args.dtype)
    gpu = device.type == "cuda"
    repeats = args.repeats or (10 if gpu else 3)
    calls = args.steps or (10 if gpu else 1)
    batch = args.batch or (4 if gpu else 1)
    small_repeats = max(10, repeats)  # rounds for the millisecond-scale parts
    heap = not gpu and not args.no_heap_tuning and C.keep_freed_memory()
    print("bench_adapter: text-aware vs vanilla IP-Adapter Plus, real SD 1.5 size, random weights")
    for line in C.machine_lines(device, dtype):
        print(line)
    if not gpu:
        print(f"malloc: {'freed blocks kept in the heap (mallopt; --no-heap-tuning to turn off)' if heap else 'as is'}")
    print(f"settings: {repeats} interleaved rounds, {calls} call(s) per measurement, training batch {batch}, 512 px")

    t0 = time.perf_counter()
    unet, encoder = real_size_models("vanilla", dtype=dtype, device=device, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # image features of a random image (cond) and of a zero image (uncond), as the pipeline
        pixels = torch.randn(1, 3, 224, 224, generator=g).to(device, dtype)
        feats = encoder(torch.cat([torch.zeros_like(pixels), pixels]), output_hidden_states=True).hidden_states[-2]
    del encoder
    gc.collect()
    block = unet.add_text_image_attn(heads=RESAMPLER_DIM // 64)
    n_unet = sum(p.numel() for n, p in unet.named_parameters() if not n.startswith(("encoder_hid_proj.", "text_image_attn.")))
    print(f"built in {time.perf_counter() - t0:.0f} s: UNet {n_unet / 1e6:.0f}M parameters, text-image block "
          f"{sum(p.numel() for p in block.parameters()) / 1e6:.2f}M ({block.heads} heads)")

    def use(variant: str) -> None:
        unet.text_image_attn = block if variant == "text-aware" else None

    verdicts = {}
    # ---------------------------------------------------------------------------------------------- (a)
    if args.only in (None, "sampling"):
        latents = torch.randn(2, 4, SD15_UNET["sample_size"], SD15_UNET["sample_size"], generator=g).to(device, dtype)
        text = torch.randn(2, TEXT_LEN, SD15_UNET["cross_attention_dim"], generator=g).to(device, dtype)
        cond = {"image_embeds": [feats[:, None]]}  # (2, 1, 257, 1280): one reference image per row
        t = torch.tensor(500, device=device)

        @torch.no_grad()
        def unet_call():
            return unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=cond).sample

        def step(variant):
            def run():
                use(variant)
                return unet_call()
            return run

        with torch.no_grad():  # these two calls are also the warm-up
            use("vanilla")
            out_v = unet_call()
            tokens = unet.process_encoder_hidden_states(text, cond)[1][0]  # (2, 1, 16, 768)
            use("text-aware")
            out_t = unet_call()
        print(f"\n(a) sampling: one guided UNet call, batch 2 [uncond, cond], latents {tuple(latents.shape)}; "
              f"text-aware at init (zero to_out) equals vanilla: {torch.equal(out_v, out_t)}")
        times, peaks, cpu = C.interleaved({"vanilla": step("vanilla"), "text-aware": step("text-aware")}, device,
                                          repeats=repeats, calls=calls, warmup=0, progress="sampling")

        lines, v = C.ratio_table("sampling, seconds per guided UNet call:", times, "vanilla",
                                 targets={"text-aware": TARGETS["sampling"]}, peaks=peaks, cpu=None if gpu else cpu)
        verdicts["sampling, full call"] = f"{C.median(C.paired_ratios(times, 'text-aware', 'vanilla')):.3f}x {v['text-aware']}"
        print("\n".join(lines))

        # The two calls differ only in process_encoder_hidden_states (the rest is the same code on the same
        # inputs: the block changes the tokens' values, not their shape). Time that part alone, many rounds.
        def encoder_states(variant):
            @torch.no_grad()
            def run():
                use(variant)
                return unet.process_encoder_hidden_states(text, cond)
            return run

        @torch.no_grad()
        def block_call():
            return block(tokens, text)

        small_calls = 50 if gpu else 10
        step_v = C.median(times["vanilla"])
        ratio, extra, (lo, hi), parts = C.differing_part(
            {"vanilla": encoder_states("vanilla"), "text-aware": encoder_states("text-aware"), "block": block_call},
            device, base="vanilla", other="text-aware", full_base_seconds=step_v, repeats=small_repeats,
            calls=small_calls)
        result = "pass" if ratio <= TARGETS["sampling"] else "FAIL"
        verdicts["sampling, differing part"] = f"{ratio:.4f}x {result}"
        print(f"  the differing part alone, process_encoder_hidden_states (median of {small_repeats} interleaved rounds "
              f"x {small_calls} calls, batch 2): vanilla (Resampler) {C.median(parts['vanilla']) * 1e3:.2f} ms, "
              f"text-aware (Resampler + block) {C.median(parts['text-aware']) * 1e3:.2f} ms; the block alone "
              f"{C.median(parts['block']) * 1e3:.2f} ms")
        print(f"  -> extra per call {extra * 1e3:.2f} ms (per round {lo * 1e3:.2f} to {hi * 1e3:.2f} ms) = "
              f"{extra / step_v:.3%} of a vanilla call: text-aware = {ratio:.4f}x vanilla, target <= "
              f"{TARGETS['sampling']}x: {result}")

    # ---------------------------------------------------------------------------------------------- (b)
    if args.only in (None, "training"):
        scheduler = C.ddpm_scheduler()
        use("vanilla")
        params_v = C.make_trainable(unet, device, dtype)
        use("text-aware")
        params_t = C.make_trainable(unet, device, dtype)
        steppers = {"vanilla": C.AdapterStep(params_v, device, dtype),
                    "text-aware": C.AdapterStep(params_t, device, dtype)}
        print(f"\n(b) training: batch {batch}, trainable parameters (fp32): vanilla "
              f"{sum(p.numel() for p in params_v.values()) / 1e6:.1f}M, text-aware "
              f"{sum(p.numel() for p in params_t.values()) / 1e6:.1f}M; frozen UNet {dtype}")
        size = SD15_UNET["sample_size"]
        # cached-feature-like inputs, fp16 as the cache stores them; image features are the encoder's
        data = {
            "latent_mean": torch.randn(batch, 4, size, size, generator=g).to(device, torch.float16),
            "latent_std": (0.05 * torch.rand(batch, 4, size, size, generator=g)).to(device, torch.float16),
            "text_embeds": torch.randn(batch, TEXT_LEN, SD15_UNET["cross_attention_dim"], generator=g)
                                .to(device, torch.float16),
            "image_embeds": feats[1:].expand(batch, -1, -1).to(torch.float16).contiguous(),
        }
        rounds = {"vanilla": 0, "text-aware": 0}

        def train_step(variant):
            def run():
                use(variant)
                # the same noise, timesteps and latents for both variants in a given round
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rounds[variant])
                rounds[variant] += 1
                return steppers[variant](lambda: diffusion_loss(unet, scheduler, data, gen, C.SD15_SCALING_FACTOR))
            return run

        times, peaks, cpu = C.interleaved({"vanilla": train_step("vanilla"), "text-aware": train_step("text-aware")},
                                          device, repeats=repeats, calls=calls, progress="training")
        lines, v = C.ratio_table(f"training, seconds per step at batch {batch}:", times, "vanilla",
                                 targets={"text-aware": TARGETS["training"]}, peaks=peaks, cpu=None if gpu else cpu)
        verdicts["training, full step"] = f"{C.median(C.paired_ratios(times, 'text-aware', 'vanilla')):.3f}x {v['text-aware']}"
        print("\n".join(lines))

        # The steps differ only in the adapter's part: the block's forward and backward, and clipping and
        # AdamW over its 2.4M extra parameters; the UNet's forward and backward (down to the gradient of the
        # image tokens) are the same code on the same inputs. Time that part alone: the tokens' forward, a
        # backward with a fixed random gradient standing in for the UNet's, clipping, AdamW.
        grad_tokens = torch.randn(batch, 1, 16, SD15_UNET["cross_attention_dim"], generator=g).to(device)
        frozen = next(p for p in unet.parameters() if not p.requires_grad).dtype
        small_cond = {"image_embeds": [data["image_embeds"].to(frozen)[:, None]]}
        small_text = data["text_embeds"].to(frozen)

        def adapter_part(variant):
            def run():
                use(variant)

                def loss():
                    tokens = unet.process_encoder_hidden_states(small_text, small_cond)[1][0]
                    return (tokens.float() * grad_tokens).sum()
                return steppers[variant](loss)
            return run

        small_calls = 20 if gpu else 3
        step_v = C.median(times["vanilla"])
        ratio, extra, (lo, hi), parts = C.differing_part(
            {"vanilla": adapter_part("vanilla"), "text-aware": adapter_part("text-aware")}, device, base="vanilla",
            other="text-aware", full_base_seconds=step_v, repeats=small_repeats, calls=small_calls)
        result = "pass" if ratio <= TARGETS["training"] else "FAIL"
        verdicts["training, differing part"] = f"{ratio:.4f}x {result}"
        print(f"  the differing part alone, the adapter's share of a step (median of {small_repeats} interleaved rounds "
              f"x {small_calls} calls, batch {batch}): vanilla {C.median(parts['vanilla']) * 1e3:.1f} ms, "
              f"text-aware {C.median(parts['text-aware']) * 1e3:.1f} ms")
        print(f"  -> extra per step {extra * 1e3:.2f} ms (per round {lo * 1e3:.2f} to {hi * 1e3:.2f} ms) = "
              f"{extra / step_v:.3%} of a vanilla step: text-aware = {ratio:.4f}x vanilla, target <= "
              f"{TARGETS['training']}x: {result}")

    print(f"\nload avg at end: {C.load_average()}")
    if gpu:
        print(f"peak GPU memory over the whole run: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
              "(per-variant peaks in the tables)")
    print(f"\nsummary, text-aware / vanilla (targets: sampling <= {TARGETS['sampling']}x, training <= "
          f"{TARGETS['training']}x):")
    for k, x in verdicts.items():
        print(f"  {k:<26} {x}")


if __name__ == "__main__":
    main()
