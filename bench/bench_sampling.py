"""How fast helpers.sample.generate.generate makes images on this machine (images per second).

    python bench/bench_sampling.py                     # active profile (tiny, 64 px, on a CPU)
    python bench/bench_sampling.py --profile full      # SD 1.5 + IP-Adapter Plus, 512 px, fp16 on a GPU
                                                       # (downloads the models from the Hub)

Each figure is a 30-step image with classifier-free guidance (the profile's scale, 7.5), one reference,
timed after a warm-up, at batch 1 and at the batch size `pick_batch_size` chooses for this device (on a
CPU that is 1; --batch-sizes adds others). The script prints the device; quote it with the figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(bank, reference, n_images: int, batch_size: int, *, steps: int, model: str) -> float:
    """Seconds to generate n_images (one reference, one prompt, seeds 0..n-1) in batches of batch_size."""
    from helpers.sample.generate import generate

    sync(bank.device)
    start = time.perf_counter()
    generate(bank, {"ref": reference}, ["a cartoon drawing wearing a red hat"], models=[model],
             seeds=range(n_images), steps=steps, batch_size=batch_size, progress=False)
    sync(bank.device)
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None, help="full, tiny or auto (default: $IPA_PROFILE, else auto)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=0, help="images per measurement (default: 2 x the batch, at least 4)")
    ap.add_argument("--batch-sizes", default="", help="extra batch sizes to time, e.g. 2,4")
    ap.add_argument("--model", default="pretrained", help="bank model to time (all share the same cost)")
    ap.add_argument("--runs-dir", default=None, help="notebook 03's runs folder (only needed for --model finetuned-*)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import datasets

    from helpers.profile import get_profile
    from helpers.sample.bank import load_models
    from helpers.sample.generate import pick_batch_size

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    bank = load_models(profile, args.runs_dir, verbose=False)
    if args.model not in bank.models:
        raise SystemExit(f"model {args.model!r} is not available: {bank.missing.get(args.model, 'unknown name')}")
    reference = datasets.load_dataset(profile.dataset, split="train")[0]["image"].convert("RGB")
    picked = pick_batch_size(bank.device, profile.resolution, profile.guidance_scale)
    sizes = list(dict.fromkeys([1, picked] + [int(b) for b in args.batch_sizes.split(",") if b.strip()]))

    print(f"device:  {device_name(bank.device)}, {bank.dtype}")
    print(f"profile: {profile.name}{' (random weights)' if profile.random_weights else ''}, {profile.resolution} px, "
          f"{args.steps} steps, guidance {profile.guidance_scale}, model {args.model}; "
          f"pick_batch_size chose {picked}")
    time_generate(bank, reference, 1, 1, steps=args.steps, model=args.model)  # warm-up
    print(f"{'batch':>5}  {'images':>6}  {'seconds':>8}  {'images/s':>8}")
    for b in sizes:
        n = args.images or max(4, 2 * b)
        seconds = time_generate(bank, reference, n, b, steps=args.steps, model=args.model)
        note = "  (picked)" if b == picked else ""
        print(f"{b:>5}  {n:>6}  {seconds:>8.2f}  {n / seconds:>8.3f}{note}")
    if bank.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(bank.device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
