"""The T4 budget measured: on any CUDA GPU, made to look like a free Colab T4 (issue 19, part 3).

    ./run.sh gpu-check [--wheels DIR] [--output FILE]          # writes bench/results/gpu_check.json
    python bench/gpu_check.py --tiny --output /tmp/check.json  # its plumbing, on the CPU, tiny models

A T4 on a bigger GPU: memory capped at 15 GiB (torch.cuda.set_per_process_memory_fraction), fp16 (frozen
weights fp16, Accelerate's fp16 autocast and GradScaler), and SDPA without flash attention
(torch.backends.cuda.enable_flash_sdp(False), and cuDNN attention off: sm75 has neither), so attention takes
the memory-efficient kernel, as on a T4. On SD 1.5-size models and CLIPSeg at its published config, all
with random weights (nothing is downloaded), it runs the code the counted budget ran (bench/_t4_steps.py):

    segmenter CLIPSeg (CIDAS/clipseg-rd64-refined, fp16) at the counted batch (8): helpers.data.masks's own
              segment_probabilities on synthetic drawings (processor, model, sigmoid, resize: what notebooks
              01 and 05 pay), and the model call alone as the budget counted it (77 text positions): s/call,
              peak allocated and reserved
    training  up to 20 steps of each variant at the profile's batch and resolution: median s/step, peak
              allocated and reserved, GradScaler-skipped steps
    sampling  the profile's 30-step guided sampling of the evaluation's batch (generate's pipeline call and
              the VAE decode): s/image
    cache     the feature cache's encoding (helpers.data.features.encode_batch: VAE, text and image encoder)
              of up to 256 synthetic drawings: images/s

Each measured time goes through helpers.support.budget_measured (training_speed_line, sampling_speed_line,
feature_cache_speed_line, segmenter_speed_line): the fraction of the T4's 65 TFLOPS fp16 peak the counted
FLOPs in that time imply, beside the T4 projection, and the counted memory beside the measured peak. On a
GPU that is not a T4 the output says so: the fractions are of the T4's peak, but the times are that card's,
not a T4's; only the memory (capped as a T4's) carries over as it is. The figures end in one block to paste
(the GPU's name, the package versions, the date), and in the JSON file, written again after each part.

Time boxes: each part's measuring loop stops after --part-seconds (default 60; at least 3 training steps,
one cache batch, one segmenter call), and once the run has taken --run-seconds (default 330) the parts not
started yet are skipped (said in the output and the JSON), so a run ends within about --run-seconds plus
the last part started (its models are built on the CPU first: random weights for ~1.5B parameters).

A GPU machine may have torch, transformers and accelerate but not diffusers: with --wheels DIR (or
$IPA_WHEELS) the check installs the missing ones from the wheels there (pip --no-deps, into a folder of its
own, torch never touched).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
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
PART_SECONDS, RUN_SECONDS = 60.0, 330.0  # the time boxes (module docstring)
MIN_STEPS = 3  # training steps measured even past a part's time box (the first one warms up)


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


def _peaks(device, prefix: str = "") -> dict:
    if device.type != "cuda":
        return {}
    return {f"{prefix}peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            f"{prefix}peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def _timed_calls(fn, device, calls: int, seconds: float, least: int = 1) -> list[float]:
    """Seconds of each of up to `calls` calls of fn(), stopping once `seconds` have passed (after `least`)."""
    times, t0 = [], time.perf_counter()
    while len(times) < calls and (len(times) < least or time.perf_counter() - t0 < seconds):
        C.sync(device)
        t = time.perf_counter()
        fn()
        C.sync(device)
        times.append(time.perf_counter() - t)
    return times


# --------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------


def check_segmenter(profile, *, device="cpu", dtype=torch.float16, folder: Path):
    """A helpers.data.masks.Segmenter as load_segmenter gives it, with random weights: the profile's CLIPSeg
    from its config (_t4_steps.segmenter_model: the published CIDAS/clipseg-rd64-refined config for the full
    profile), and its processor made by helpers.data.masks.segmenter_processor from `folder`, into which the
    profile's files are copied (_t4_steps.segmenter_files: preprocessor_config.json, 352 px for CLIPSeg's, and
    the tokenizer's configs), with the tiny profile's CLIP vocabulary where the profile's own is a download
    (the ids only index random embeddings; subject words are one token either way)."""
    from helpers.data.masks import Segmenter, segmenter_processor
    from helpers.tiny.tokenizer import save_tokenizer

    for f in S.segmenter_files(profile).iterdir():
        if f.suffix in (".json", ".txt"):  # configs, vocabulary, merges; not the weights
            shutil.copyfile(f, folder / f.name)
    if not (folder / "vocab.json").is_file():
        save_tokenizer(folder)
    model = S.segmenter_model(profile, device=device, dtype=dtype)
    return Segmenter(str(profile.segmenter), segmenter_processor(str(folder)), model)


def measure_segmenter(profile, device, dtype, batch: int, calls: int, seconds: float) -> dict:
    """CLIPSeg at `batch` (image, prompt) pairs per call: helpers.data.masks.segment_probabilities on synthetic
    drawings at the profile's resolution with their mask prompts (processor, model, sigmoid, resize, copy
    back), then the model call alone as the budget counted it (_t4_steps.segment_call: the text tower's 77
    positions). Each: up to `calls` calls or `seconds`, after a warm-up; median seconds per call and the peaks."""
    from helpers.data.masks import mask_prompt, segment_probabilities
    from helpers.tiny.cartoons import CHARACTERS, POSES, SCENES, cartoon_caption, draw_character

    keys = [(i % len(CHARACTERS), POSES[i % len(POSES)], i % len(SCENES)) for i in range(batch)]
    drawings = [draw_character(*k, size=profile.resolution) for k in keys]
    prompts = [mask_prompt(cartoon_caption(*k)) for k in keys]
    with tempfile.TemporaryDirectory() as tmp:
        seg = check_segmenter(profile, device=device, dtype=dtype, folder=Path(tmp))
    size = S.segmenter_size(profile)
    positions = len(seg.processor.tokenizer(prompts, padding=True)["input_ids"][0])

    def masks_call():
        segment_probabilities(drawings, prompts, segmenter=seg, batch_size=batch)

    masks_call()  # warm-up
    _free(device)
    whole = _timed_calls(masks_call, device, calls, seconds)
    out = {"model": str(profile.segmenter), "parameters": sum(p.numel() for p in seg.model.parameters()),
           "batch": batch, "image_size": size, "resolution": profile.resolution, "prompt_positions": positions,
           "calls": len(whole), "s_per_call": statistics.median(whole),
           "s_per_image": statistics.median(whole) / batch, **_peaks(device, "masks_")}
    inputs = S.segmenter_inputs(seg.model, batch, size, device=device)
    inputs["pixel_values"].normal_()
    S.segment_call(seg.model, inputs, profile.resolution)  # warm-up
    _free(device)
    alone = _timed_calls(lambda: S.segment_call(seg.model, inputs, profile.resolution), device, calls, seconds)
    return {**out, "model_text_positions": inputs["input_ids"].shape[1], "model_calls": len(alone),
            "model_s_per_call": statistics.median(alone), **_peaks(device)}


def measure_training(profile, variant: str, device, dtype, steps: int, seconds: float) -> dict:
    """Up to `steps` training steps (helpers.train.step.training_step) of `variant`, stopping once `seconds`
    have passed (after MIN_STEPS): seconds of each (the median leaves out the first, a warm-up, where there
    are more), the peaks."""
    from accelerate import Accelerator

    from helpers.train.step import training_step

    unet = S.profile_unet(profile, variant, device=device, dtype=dtype)
    accelerator = Accelerator(mixed_precision="fp16") if device.type == "cuda" else Accelerator(cpu=True)
    _free(device)
    with tempfile.TemporaryDirectory() as tmp:
        run = S.training_run(unet, profile, variant, out=Path(tmp), accelerator=accelerator)
        skipped = []

        def step():
            training_step(run, len(skipped))
            skipped.append(bool(accelerator.optimizer_step_was_skipped))

        times = _timed_calls(step, device, steps, seconds, least=min(steps, MIN_STEPS))
    steady = times[1:] or times
    return {"steps": len(times), "median_s_per_step": statistics.median(steady), "first_step_s": times[0],
            "skipped_steps": sum(skipped), **_peaks(device)}


def measure_cache(profile, pipe, device, images: int, seconds: float) -> dict:
    """encode_batch over up to `images` synthetic drawings in the profile's feature batches (stopping once
    `seconds` have passed, after one batch): images per second."""
    from helpers.data.features import encode_batch
    from helpers.tiny.cartoons import CHARACTERS, POSES, SCENES, cartoon_caption, draw_character

    keys = [(i % len(CHARACTERS), POSES[i % len(POSES)], i % len(SCENES)) for i in range(images)]
    drawings = [draw_character(*k, size=profile.resolution) for k in keys]
    captions = [cartoon_caption(*k) for k in keys]
    b = profile.feature_batch_size
    batches = iter(range(0, images, b))
    with torch.no_grad():
        encode_batch(pipe, drawings[:b], captions[:b], profile.resolution)  # warm-up
        _free(device)

        def one_batch():
            s = next(batches)
            encode_batch(pipe, drawings[s:s + b], captions[s:s + b], profile.resolution)
            done.append(len(drawings[s:s + b]))

        done: list[int] = []
        spent = sum(_timed_calls(one_batch, device, -(-images // b), seconds))
    return {"images": sum(done), "batch": b, "seconds": spent, "images_per_s": sum(done) / spent, **_peaks(device)}


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


# --------------------------------------------------------------------------------------------------
# Beside the counted budget, and in words
# --------------------------------------------------------------------------------------------------


def is_t4(gpu: dict | None) -> bool:
    return bool(gpu) and C.fp16_peak_tflops(gpu["name"]) == C.fp16_peak_tflops("T4")


def with_counts(result: dict, device_info: dict, self_test: bool) -> dict:
    """The measured figures beside the counted ones (helpers/support/t4_budget.json), each time turned by
    helpers.support.budget_measured into the fraction of the T4's fp16 peak it implies (fraction_of_t4_peak, and
    the projection beside it: t4_line) and of this GPU's own peak (fraction_of_peak). Tiny models: no counts."""
    from helpers.support import budget_counts as B
    from helpers.support import budget_measured as M

    b = B.t4_budget()
    result["counted"] = f"helpers/support/t4_budget.json ({b['settings']['profile']} profile, {b['how']['date']})"
    peak = (device_info["gpu"] or {}).get("fp16_peak_tflops")
    if self_test:  # the tiny models' figures sit beside no count
        return result

    def fractions(m: dict, efficiency, line, seconds: float, **kw) -> None:
        m["fraction_of_t4_peak"] = efficiency(seconds, **kw)
        m["tflops"] = m["fraction_of_t4_peak"] * B.T4_FP16_TFLOPS
        m["fraction_of_peak"] = efficiency(seconds, peak_tflops=peak, **kw) if peak else None
        m["t4_line"] = line(seconds, **kw)

    for variant, m in result.get("training", {}).items():
        if "median_s_per_step" not in m or variant not in b["training"]:
            continue
        batch = result.get("train_batch_size")
        m.update(counted_peak_gib=B.training_peak_gib(variant),
                 counted_tflop_per_step=B.training_tflop_per_step(variant, batch_size=batch))
        fractions(m, M.training_step_efficiency, M.training_speed_line, m["median_s_per_step"], variant=variant,
                  batch_size=batch)
    c = result.get("feature_cache", {})
    if "images_per_s" in c:
        c["counted_tflop_per_image"] = B.feature_cache_tflop()

        def cache_efficiency(seconds, peak_tflops=B.T4_FP16_TFLOPS):  # seconds per batch
            return M.implied_efficiency(seconds, B.feature_cache_tflop(c["batch"]), peak_tflops=peak_tflops)

        fractions(c, cache_efficiency, lambda seconds: M.feature_cache_speed_line(seconds, c["batch"]),
                  c["batch"] / c["images_per_s"])
    s = result.get("sampling", {})
    if "s_per_image" in s:
        s.update(counted_tflop_per_image=B.image_tflop(s["steps"]), counted_peak_gib=b["sampling"]["peak_gib"])
        fractions(s, M.image_efficiency, M.sampling_speed_line, s["s_per_image"], steps=s["steps"])
    g = result.get("segmenter", {})
    if "s_per_call" in g:
        g.update(counted_tflop_per_call=B.segmenter_tflop(g["batch"]), counted_peak_gib=b["segmenter"]["peak_gib"],
                 counted_batch=b["segmenter"]["batch"])

        def efficiency(seconds, peak_tflops=B.T4_FP16_TFLOPS):
            return M.implied_efficiency(seconds, B.segmenter_tflop(g["batch"]), peak_tflops=peak_tflops)

        def line(seconds):
            return M.segmenter_speed_line(seconds, g["batch"])

        fractions(g, efficiency, line, g["model_s_per_call"])  # the counted work: the model call alone
        g["masks_fraction_of_t4_peak"] = efficiency(g["s_per_call"])  # what notebooks 01 and 05 pay per call
        g["masks_fraction_of_peak"] = efficiency(g["s_per_call"], peak_tflops=peak) if peak else None
        g["masks_t4_line"] = line(g["s_per_call"])
    return result


def _memory(m: dict, prefix: str = "") -> str:
    """"; peak 6.20 GiB allocated (counted 6.11) / 6.50 reserved", or "" without a GPU."""
    if f"{prefix}peak_allocated_gib" not in m:
        return ""
    beside = f" (counted {m['counted_peak_gib']:.2f})" if not prefix and "counted_peak_gib" in m else ""
    return (f"; peak {m[prefix + 'peak_allocated_gib']:.2f} GiB allocated{beside} / "
            f"{m[prefix + 'peak_reserved_gib']:.2f} reserved")


def _speed(m: dict, prefix: str = "") -> list[str]:
    """helpers.support.budget_measured's line for a measured time, and the fraction of this GPU's own peak after it."""
    if f"{prefix}t4_line" not in m:
        return []
    own = m.get(f"{prefix}fraction_of_peak")
    return [f"    {m[prefix + 't4_line']}" + (f"; {own:.1%} of this GPU's own fp16 peak" if own else "")]


def check_lines(result: dict) -> list[str]:
    """The results as one block of lines to paste (README, docs): where, when, with what; each part measured,
    the counted memory beside it, and helpers.support.budget_measured's line for its time; whether the card is a T4.
    Reads only what the JSON file holds (check_lines(json.load(file)) gives the same lines)."""
    mc, gpu, cap = result["machine"], result["machine"]["gpu"], result["t4_emulation"]
    where = (f"{gpu['name']} ({gpu['total_gib']:g} GiB, compute capability {gpu['capability']}) as a T4: memory "
             f"capped at {cap['memory_cap_gib']:g} GiB, fp16, flash and cuDNN attention off" if gpu
             else "the CPU (self-test: NO GPU, tiny models)")
    lines = [f"GPU check ({result['date']}) on {where}; torch {mc['torch']} (CUDA {mc['cuda']}), diffusers "
             f"{mc['diffusers']}, transformers {mc['transformers']}, accelerate {mc['accelerate']}, Python "
             f"{mc['python']}; the {result['profile']} profile's models with random weights "
             f"(bench/gpu_check.py, {result['wall_s']:.0f} s in all):"]

    def measured(name: str, m: dict) -> bool:
        """False (and a line saying why) for a part that failed or was skipped."""
        if "error" in m:
            lines.append(f"  {name}: FAILED ({m['error']})")
        elif "skipped" in m:
            lines.append(f"  {name}: SKIPPED ({m['skipped']})")
        return bool(m) and "error" not in m and "skipped" not in m

    g = result.get("segmenter", {})
    if measured("segmenter", g):
        lines += [f"  segmenter {g['model']} ({g['parameters']:,} parameters), calls of {g['batch']} images "
                  f"of {g['resolution']} px, seen at {g['image_size']} px:",
                  f"   helpers.data.masks.segment_probabilities: {g['s_per_call']:.3f} s per call (median of "
                  f"{g['calls']}; processor, sigmoid, resize and copy back included; prompts of "
                  f"{g['prompt_positions']} tokens){_memory(g, 'masks_')}", *_speed(g, "masks_"),
                  f"   the model call alone, {g['model_text_positions']} text positions as counted: "
                  f"{g['model_s_per_call']:.3f} s per call (median of {g['model_calls']}){_memory(g)}", *_speed(g)]
    for variant, m in result.get("training", {}).items():
        if measured(f"training {variant}", m):
            lines += [f"  training {variant}: {m['median_s_per_step']:.3f} s/step (median of {max(1, m['steps'] - 1)}"
                      f" after a first of {m['first_step_s']:.2f} s; {m['skipped_steps']} skipped by the GradScaler)"
                      f"{_memory(m)}", *_speed(m)]
    s = result.get("sampling", {})
    if measured("sampling", s):
        lines += [f"  sampling: {s['s_per_image']:.2f} s/image ({s['steps']} steps, batch {s['batch']}, the VAE decode "
                  f"included){_memory(s)}", *_speed(s)]
    c = result.get("feature_cache", {})
    if measured("feature cache", c):
        lines += [f"  feature cache: {c['images_per_s']:.1f} images/s ({c['images']} synthetic drawings, batch "
                  f"{c['batch']}){_memory(c)}", *_speed(c)]
    if not gpu:
        lines.append("  NOT A GPU MEASUREMENT: the CPU self-test of the check's plumbing on the tiny models; no figure "
                     "above is a GPU's or a T4's, and none sits beside a count.")
    elif is_t4(gpu):
        lines.append("  On a T4: the times above are a T4's, and the fractions of its peak its own.")
    else:
        lines.append(f"  NOT A T4: {gpu['name']}, its memory capped at a T4's. The fractions are of the T4's 65 "
                     "TFLOPS fp16 peak, but the times are this card's, not a T4's (over 100%: faster than a T4 at its "
                     "peak; a T4 reaches a smaller share, the expected ones the projections use). The memory figures "
                     "carry over.")
    return lines


def _save(result: dict, out: Path | None) -> None:
    """The result so far, as JSON, in one rename (what a run cut short had measured stays)."""
    if out is not None:
        from helpers.support.atomic import write_text

        write_text(out, json.dumps(result, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--wheels", default=os.environ.get(WHEELS_ENV), help=f"folder of wheels for missing packages "
                                                                         f"(default ${WHEELS_ENV})")
    ap.add_argument("--tiny", action="store_true", help="the CPU self-test: tiny models, no GPU needed")
    ap.add_argument("--steps", type=int, default=20, help="training steps per variant at most (default %(default)s)")
    ap.add_argument("--images", type=int, default=None, help="feature-cache images at most (default 256; --tiny 8)")
    ap.add_argument("--calls", type=int, default=10, help="segmenter calls at most, each way (default %(default)s)")
    ap.add_argument("--part-seconds", type=float, default=PART_SECONDS,
                    help="time box of each part's measuring loop (default %(default)g)")
    ap.add_argument("--run-seconds", type=float, default=RUN_SECONDS,
                    help="no part starts after this many seconds of the run (default %(default)g)")
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
    from helpers.support.budget_counts import t4_budget

    t0 = time.perf_counter()
    out = Path(args.output) if args.output else (RESULTS if gpu else None)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.float16 if gpu else torch.float32
    # the counted budget's settings, whatever $IPA_QUICK or $IPA_RESOLUTION say: the figures sit side by side
    profile = full_profile("gpu check") if gpu else tiny_profile("gpu check --tiny")
    result = {"self_test": not gpu, "date": datetime.date.today().isoformat(), "machine": machine(device),
              "t4_emulation": t4_like(device), "profile": profile.name, "train_batch_size": profile.train_batch_size,
              "time_boxes": {"part_seconds": args.part_seconds, "run_seconds": args.run_seconds},
              "training": {}}
    box = args.part_seconds

    def part(name: str, fn) -> dict:
        """fn()'s figures, or why there are none; the result so far written again (with_counts, _save)."""
        if time.perf_counter() - t0 > args.run_seconds:
            print(f"  {name}: SKIPPED, the run's time box ({args.run_seconds:g} s) is spent")
            return {"skipped": f"the run's time box of {args.run_seconds:g} s was spent"}
        print(f"  {name} ...", flush=True)
        m = _attempt(name, fn)
        _free(device)
        return m

    def keep() -> None:
        result["wall_s"] = time.perf_counter() - t0
        _save(with_counts(result, result["machine"], self_test=not gpu), out)

    batch = t4_budget()["segmenter"]["batch"]  # the counted call's
    result["segmenter"] = part("segmenter", lambda: measure_segmenter(profile, device, dtype, batch, args.calls, box))
    keep()
    for variant in S.VARIANTS:
        result["training"][variant] = part(f"training {variant}", lambda: measure_training(
            profile, variant, device, dtype, args.steps, box))
        keep()
    pipes = []  # the text-aware pipeline, built by the first part that needs it

    def pipeline():
        if not pipes:
            pipes.append(S.profile_pipeline(profile, "text_aware", device=device, dtype=dtype))
        return pipes[0]

    # sampling before the cache: far more of the series' time is sampling's, should the run's box run out
    result["sampling"] = part("sampling", lambda: measure_sampling(profile, pipeline(), device))
    keep()
    result["feature_cache"] = part("feature cache", lambda: measure_cache(
        profile, pipeline(), device, args.images or (256 if gpu else 8), box))
    keep()
    result["lines"] = check_lines(result)
    _save(result, out)
    print("\nPaste into README / docs:\n```text", *result["lines"], "```", sep="\n")
    if out is not None:
        print(f"wrote {out} ({result['wall_s']:.0f} s)")
    parts = {"segmenter": result["segmenter"], **{f"training {v}": m for v, m in result["training"].items()},
             "sampling": result["sampling"], "feature cache": result["feature_cache"]}
    missing = [name for name, m in parts.items() if "error" in m or "skipped" in m]
    if missing:
        print(f"NOT MEASURED: {', '.join(missing)} (failed or skipped: see above); rerun with more time "
              "(--run-seconds, --part-seconds) or fix the failure")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
