"""The T4 budget measured: on any CUDA GPU, made to look like a free Colab T4 (issue 19, part 3).

    ./run.sh gpu-check [--wheels DIR]                          # writes bench/results/gpu_check.json
    python bench/gpu_check.py --tiny --output /tmp/check.json  # its plumbing, on the CPU, tiny models

A T4 on a bigger GPU: memory capped at 15 GiB (torch.cuda.set_per_process_memory_fraction), fp16 (frozen
weights fp16, Accelerate's fp16 autocast and GradScaler), and SDPA without flash attention
(torch.backends.cuda.enable_flash_sdp(False), and cuDNN attention off: sm75 has neither), so attention takes
the memory-efficient kernel, as on a T4. On SD 1.5-size models with random weights (nothing is downloaded)
it runs the code the counted budget ran (bench/_t4_steps.py):

    training  20 steps of each variant at the profile's batch and resolution: median s/step, peak allocated
              and reserved, GradScaler-skipped steps
    cache     the feature cache's encoding (helpers.data.features.encode_batch: VAE, text and image encoder)
              of a few hundred synthetic drawings: images/s
    sampling  the profile's 30-step guided sampling of the evaluation's batch (generate's pipeline call and
              the VAE decode): s/image

and prints the FLOP/s it reached (the counted FLOPs of helpers/support/t4_budget.json over the measured
time) as a fraction of this GPU's fp16 peak, beside the counted memory. A T4's own fraction is lower than a
big GPU's: the figures that matter for a T4 are the memory (capped as a T4's) and, read with care, the
fractions. A GPU machine may have torch, transformers and accelerate but not diffusers: with --wheels DIR
(or $IPA_WHEELS) the check installs the missing ones from the wheels there (pip --no-deps, into a folder of
its own, torch never touched). It takes a few minutes (under 8 on a GPU).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common as C
import _t4_steps as S
import torch

RESULTS = C.ROOT / "bench" / "results" / "gpu_check.json"
T4_MEMORY_GIB = 15.0  # a free Colab T4: 15 GiB, of which torch sees ~14.7
WHEELS_ENV = "IPA_WHEELS"
NEEDED = ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "PIL", "numpy")
NEVER_INSTALLED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia[-_].*)$")  # the machine's own


# --------------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------------


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def wheels_to_install(folder: Path) -> list[Path]:
    """The wheels in `folder` whose distribution is missing here or older than the wheel; never torch and its
    kin (the machine's own CUDA build stays)."""
    from packaging.version import InvalidVersion, Version

    chosen = []
    for wheel in sorted(folder.glob("*.whl")):
        name = _dist_name(wheel)
        if NEVER_INSTALLED.match(name.replace("-", "_")) or NEVER_INSTALLED.match(name):
            continue
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            chosen.append(wheel)
            continue
        try:
            if installed < Version(wheel.name.split("-")[1]):
                chosen.append(wheel)
        except (IndexError, InvalidVersion):
            raise SystemExit(f"{wheel}: not a wheel's file name (NAME-VERSION-...whl)") from None
    return chosen


def install_missing(folder: Path | None, say=print) -> list[str]:
    """Install the wheels of `folder` that are missing (wheels_to_install) with pip --no-deps into a folder of
    their own, put it first on sys.path, and return their names. Raises SystemExit naming what is still
    missing of NEEDED."""
    installed = []
    if folder is not None:
        wheels = wheels_to_install(folder)
        if wheels:
            target = Path(tempfile.gettempdir()) / "ipa-gpu-check-site"
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--no-compile", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
            sys.path.insert(0, str(target))
            importlib.invalidate_caches()
            installed = [w.name for w in wheels]
            say(f"installed from {folder} (pip --no-deps, into {target}): {', '.join(installed)}")
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"gpu-check needs {', '.join(missing)}: give a folder of wheels with --wheels DIR or "
                         f"${WHEELS_ENV} (pip download --no-deps NAME==VERSION, for this machine's python)")
    return installed


# --------------------------------------------------------------------------------------------------
# The T4 on this machine
# --------------------------------------------------------------------------------------------------


def t4_like(device: torch.device) -> dict:
    """Cap memory at a T4's, turn off the attention kernels a T4 lacks; returns what was set."""
    if device.type != "cuda":
        return {"memory_cap_gib": None, "note": "CPU self-test: no cap, no attention kernels to choose"}
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    fraction = min(1.0, T4_MEMORY_GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    return {"memory_cap_gib": T4_MEMORY_GIB, "fraction": fraction, "dtype": "fp16",
            "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                     "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                     "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}}


def machine(device: torch.device) -> dict:
    import accelerate
    import diffusers
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "total_gib": round(p.total_memory / 2**30, 1), "fp16_peak_tflops": C.fp16_peak_tflops(p.name)}
    else:
        out["gpu"] = None
    return out


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


# --------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------


def measure_training(profile, variant: str, device, dtype, steps: int) -> dict:
    """`steps` training steps (helpers.train.step.training_step) of `variant`: seconds of each, the peaks."""
    from accelerate import Accelerator

    from helpers.train.step import training_step

    unet = S.profile_unet(profile, variant, device=device, dtype=dtype)
    accelerator = Accelerator(mixed_precision="fp16") if device.type == "cuda" else Accelerator(cpu=True)
    _free(device)
    with tempfile.TemporaryDirectory() as tmp:
        run = S.training_run(unet, profile, variant, out=Path(tmp), accelerator=accelerator)
        times, skipped = [], 0
        for step in range(steps):
            C.sync(device)
            t0 = time.perf_counter()
            training_step(run, step)
            C.sync(device)
            times.append(time.perf_counter() - t0)
            skipped += bool(accelerator.optimizer_step_was_skipped)
    return {"steps": steps, "median_s_per_step": statistics.median(times), "first_step_s": times[0],
            "skipped_steps": skipped, **_peaks(device)}


def measure_cache(profile, pipe, device, images: int) -> dict:
    """encode_batch over `images` synthetic drawings in the profile's feature batches: images per second."""
    from helpers.data.features import encode_batch
    from helpers.tiny.cartoons import CHARACTERS, POSES, SCENES, cartoon_caption, draw_character

    keys = [(i % len(CHARACTERS), POSES[i % len(POSES)], i % len(SCENES)) for i in range(images)]
    drawings = [draw_character(*k, size=profile.resolution) for k in keys]
    captions = [cartoon_caption(*k) for k in keys]
    b = profile.feature_batch_size
    with torch.no_grad():
        encode_batch(pipe, drawings[:b], captions[:b], profile.resolution)  # warm-up
        _free(device)
        C.sync(device)
        t0 = time.perf_counter()
        for s in range(0, images, b):
            encode_batch(pipe, drawings[s:s + b], captions[s:s + b], profile.resolution)
        C.sync(device)
    seconds = time.perf_counter() - t0
    return {"images": images, "batch": b, "seconds": seconds, "images_per_s": images / seconds, **_peaks(device)}


def measure_sampling(profile, pipe, device) -> dict:
    """generate's pipeline call for the evaluation's batch at the profile's steps, then the decode: s/image."""
    batch, steps = S.eval_batch(profile), profile.num_inference_steps
    size = pipe.image_encoder.config.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=pipe.image_encoder.dtype)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds = S.reference_embeds(pipe, pixels, profile.guidance_scale > 1)
    S.decode(pipe, S.pipeline_call(pipe, profile, batch, min(2, steps), embeds))  # warm-up
    _free(device)
    C.sync(device)
    t0 = time.perf_counter()
    S.decode(pipe, S.pipeline_call(pipe, profile, batch, steps, embeds))
    C.sync(device)
    seconds = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "seconds": seconds, "s_per_image": seconds / batch, **_peaks(device)}


def _attempt(name: str, fn, say=print) -> dict:
    """fn() -> dict, or {"error": ...} when it fails (the check goes on with the next part)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (reported, then the next part)
        say(f"  {name} FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def with_counts(result: dict, device_info: dict, self_test: bool) -> dict:
    """The measured figures beside the counted ones (helpers/support/t4_budget.json), and the FLOP/s reached
    as a fraction of this GPU's fp16 peak."""
    from helpers.support.budget import t4_budget

    b = t4_budget()
    result["counted"] = f"helpers/support/t4_budget.json ({b['settings']['profile']} profile, {b['how']['date']})"
    peak = (device_info["gpu"] or {}).get("fp16_peak_tflops")
    if self_test:  # the tiny models' figures sit beside no count
        return result
    for variant, m in result.get("training", {}).items():
        if "error" in m or variant not in b["training"]:
            continue
        counted = b["training"][variant]["plain"]
        m.update(counted_peak_gib=counted["peak_gib"], counted_tflop_per_step=counted["tflop"])
        m["tflops"] = counted["tflop"] / m["median_s_per_step"]
        m["fraction_of_peak"] = m["tflops"] / peak if peak else None
    s = result.get("sampling", {})
    if "s_per_image" in s:
        s.update(counted_tflop_per_image=b["sampling"]["tflop_per_image"], counted_peak_gib=b["sampling"]["peak_gib"])
        s["tflops"] = b["sampling"]["tflop_per_image"] / s["s_per_image"]
        s["fraction_of_peak"] = s["tflops"] / peak if peak else None
    return result


def check_lines(result: dict) -> list[str]:
    """The results as lines: measured, counted beside, the fraction of the GPU's peak."""
    def pct(m):
        if "tflops" not in m:
            return ""
        if not m.get("fraction_of_peak"):
            return f", {m['tflops']:.1f} TFLOP/s (this GPU's fp16 peak is not in bench/_common's table)"
        return f", {m['tflops']:.1f} TFLOP/s = {m['fraction_of_peak']:.0%} of its fp16 peak"

    gpu = result["machine"]["gpu"]
    where = (f"{gpu['name']}, as a T4: {T4_MEMORY_GIB:g} GiB, fp16, no flash attention" if gpu
             else "the CPU (self-test: NO GPU)")
    lines = [f"GPU check on {where}"]
    for variant, m in result["training"].items():
        if "error" in m:
            lines.append(f"  training {variant}: FAILED ({m['error']})")
            continue
        mem = (f", peak {m['peak_allocated_gib']:.2f} GiB allocated / {m['peak_reserved_gib']:.2f} reserved"
               if "peak_allocated_gib" in m else "")
        counted = f" (counted {m['counted_peak_gib']:.2f})" if "counted_peak_gib" in m and mem else ""
        lines.append(f"  training {variant}: {m['median_s_per_step']:.3f} s/step (median of {m['steps']}, "
                     f"{m['skipped_steps']} skipped by the GradScaler){mem}{counted}{pct(m)}")
    c = result["feature_cache"]
    lines.append(f"  feature cache: FAILED ({c['error']})" if "error" in c else
                 f"  feature cache: {c['images_per_s']:.1f} images/s ({c['images']} synthetic drawings, "
                 f"batch {c['batch']})")
    s = result["sampling"]
    lines.append(f"  sampling: FAILED ({s['error']})" if "error" in s else
                 f"  sampling: {s['s_per_image']:.2f} s/image ({s['steps']} steps, batch {s['batch']}){pct(s)}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--wheels", default=os.environ.get(WHEELS_ENV), help=f"folder of wheels for missing packages "
                                                                         f"(default ${WHEELS_ENV})")
    ap.add_argument("--tiny", action="store_true", help="the CPU self-test: tiny models, no GPU needed")
    ap.add_argument("--steps", type=int, default=20, help="training steps per variant (default %(default)s)")
    ap.add_argument("--images", type=int, default=None, help="feature-cache images (default 256; --tiny 8)")
    ap.add_argument("--output", default=None, help=f"JSON file (default {RESULTS.relative_to(C.ROOT)}; --tiny: none)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu:
        print(f"NO GPU: torch {torch.__version__} sees no CUDA device" if not torch.cuda.is_available() else
              "NO GPU used: --tiny runs on the CPU")
        if not args.tiny:
            print("The GPU check measures a GPU: run it on a CUDA machine (./run.sh gpu-check). Its plumbing "
                  "alone: python bench/gpu_check.py --tiny")
            return 2
        print("CPU self-test of the GPU check's plumbing, on the tiny models: no figure below is a GPU measurement")
    install_missing(Path(args.wheels) if args.wheels else None)
    C.quiet_logs()
    from helpers.profile import full_profile, tiny_profile

    t0 = time.perf_counter()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.float16 if gpu else torch.float32
    # the counted budget's settings, whatever $IPA_QUICK or $IPA_RESOLUTION say: the figures sit side by side
    profile = full_profile("gpu check") if gpu else tiny_profile("gpu check --tiny")
    result = {"self_test": not gpu, "machine": machine(device), "t4_emulation": t4_like(device),
              "profile": profile.name, "training": {}}
    for variant in S.VARIANTS:
        result["training"][variant] = _attempt(f"training {variant}", lambda: measure_training(
            profile, variant, device, dtype, args.steps))
        _free(device)
    pipe = S.profile_pipeline(profile, "text_aware", device=device, dtype=dtype)
    result["feature_cache"] = _attempt("feature cache", lambda: measure_cache(
        profile, pipe, device, args.images or (256 if gpu else 8)))
    result["sampling"] = _attempt("sampling", lambda: measure_sampling(profile, pipe, device))
    result = with_counts(result, result["machine"], self_test=not gpu)
    result["wall_s"] = time.perf_counter() - t0
    print("\n".join(check_lines(result)))
    out = Path(args.output) if args.output else (RESULTS if gpu else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out} ({result['wall_s']:.0f} s)")
    failed = [k for k in ("feature_cache", "sampling") if "error" in result[k]]
    failed += [f"training {v}" for v, m in result["training"].items() if "error" in m]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
