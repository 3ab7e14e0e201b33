"""Shared parts of the real-size benchmarks (bench_adapter.py, bench_train.py): the machine description,
interleaved side-by-side timing with medians, and the tables. Imported as `_common` by scripts run as
`python bench/<script>.py` (the script's folder is then on sys.path); it also puts the repository root on
sys.path, so the working tree's `helpers` is measured even where the package is not installed.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SD15_SCALING_FACTOR = 0.18215


def quiet_logs() -> None:
    """A script's output is its figures: diffusers' and transformers' loggers at ERROR. Called by each script's
    main(), never on import: the tests import these modules, and the notebooks they run must show every warning."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def pick_device(device: str | None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda + fp16 when a GPU is present (the T4 target has no native bf16), else cpu + fp32."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


def machine_lines(device: torch.device, dtype: torch.dtype) -> list[str]:
    """What the figures were measured on: quote these lines with them."""
    import diffusers
    import transformers

    lines = []
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"device:   {p.name} (CUDA, compute capability {p.major}.{p.minor}, "
                     f"{p.total_memory / 2**30:.0f} GiB), {dtype}")
    else:
        lines.append(f"device:   CPU, {dtype}")
    lines.append(f"host:     {_cpu_model()}, {os.cpu_count()} cores, {_ram_gib():.0f} GiB RAM, torch threads "
                 f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    lines.append(f"software: python {platform.python_version()}, torch {torch.__version__}, diffusers "
                 f"{diffusers.__version__}, transformers {transformers.__version__}")
    lines.append(f"load avg at start: {load_average()}")
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of fn, over `calls` consecutive calls. The CPU seconds
    (all threads, user + system) are the second figure on a shared machine: other jobs stretch the wall
    time of a measurement far more than its CPU time."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu) / calls


def keep_freed_memory() -> bool:
    """glibc only: keep freed blocks up to 32 MiB in the heap instead of returning them to the OS, so each
    step does not page-fault its activations in again (this VM's page faults are slow: a real-size UNet
    call spends ~10-20% of its time in them). Same for every variant; returns whether it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def interleaved(variants: dict[str, Callable[[], object]], device: torch.device, *, repeats: int, calls: int,
                warmup: int = 1, before: Callable[[str], None] | None = None, progress: str = ""
                ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[float]]]:
    """Time the variants side by side: `repeats` rounds, each variant once per round (order reversed every
    other round, A B B A ..., so a drift in the machine's load falls on both alike), each measurement the
    mean over `calls` consecutive calls. `before(name)` runs untimed before each measurement (to move models
    in or out of GPU memory). Returns {name: [wall seconds per call, one per round]}, on a GPU
    {name: peak torch.cuda.max_memory_allocated in GiB over its measurements} (else {}), and
    {name: [process CPU seconds per call, one per round]}."""
    names = list(variants)
    peaks: dict[str, float] = {}
    for name in names:  # warm-up: kernels, allocator, first-touch page faults
        for _ in range(warmup):
            if before:
                before(name)
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if before:
                before(name)
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu_s = timed(variants[name], device, calls)
            times[name].append(wall)
            cpu[name].append(cpu_s)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
        if progress:
            done = ", ".join(f"{n} {times[n][-1]:.3f} s" + (f" (CPU {cpu[n][-1]:.1f} s)" if device.type == "cpu" else "")
                             for n in names)
            print(f"  {progress} round {r + 1}/{repeats}: {done}", flush=True)
    return times, peaks, cpu


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratios(times: dict[str, list[float]], name: str, base: str) -> list[float]:
    """Per-round ratios name / base (the two were measured back to back in each round)."""
    return [a / b for a, b in zip(times[name], times[base])]


def ratio_table(title: str, times: dict[str, list[float]], base: str, *, targets: dict[str, float] | None = None,
                peaks: dict[str, float] | None = None, cpu: dict[str, list[float]] | None = None
                ) -> tuple[list[str], dict[str, str]]:
    """A table: variant, median wall seconds, ratio to `base` (median of the per-round paired ratios; the
    spread is their min-max), target, result (`verdict` of the wall-time ratios), then optionally the median
    process CPU seconds and their paired ratio, and the peak GPU memory. Returns its lines and
    {variant: result} for the targeted rows."""
    targets = targets or {}
    head = f"  {'variant':<12} {'median s':>9} {'ratio':>6} {'(min-max)':>13} {'target':>8} {'result':>6}"
    if cpu:
        head += f" {'CPU s':>8} {'CPU ratio':>9}"
    if peaks:
        head += f" {'peak GiB':>9}"
    lines = [title, head]
    verdicts = {}
    note = (f"  (ratio: median over rounds of variant / {base}, the two measured back to back in each round; "
            "min-max over rounds")
    note += ("; result: pass/FAIL on the median, 'noisy' where the rounds fall on both sides of the target and "
             "spread more than twice its margin)" if targets else ")")
    for name, ts in times.items():
        if name == base:
            ratio, spread = "1.000", ""
        else:
            rs = paired_ratios(times, name, base)
            ratio, spread = f"{median(rs):.3f}", f"({min(rs):.3f}-{max(rs):.3f})"
        target = targets.get(name)
        result = ""
        if target is not None:
            result = verdicts[name] = verdict(paired_ratios(times, name, base), target)
        row = (f"  {name:<12} {median(ts):>9.4f} {ratio:>6} {spread:>13} "
               f"{('<= %.2fx' % target) if target is not None else '':>8} {result:>6}")
        if cpu:
            cratio = "1.000" if name == base else f"{median(paired_ratios(cpu, name, base)):.3f}"
            row += f" {median(cpu[name]):>8.2f} {cratio:>9}"
        if peaks:
            row += f" {peaks[name]:>9.2f}" if name in peaks else f" {'':>9}"
        lines.append(row)
    return lines + [note], verdicts


def differing_part(variants: dict[str, Callable[[], object]], device: torch.device, *, base: str, other: str,
                   full_base_seconds: float, repeats: int, calls: int) -> tuple[float, float, float, dict]:
    """The cost of the only code in which two variants differ, measured alone (milliseconds, so many rounds
    fit and the machine's noise averages out), as a ratio of a full step: 1 + extra / full_base_seconds.
    Valid when the rest of the step is the same code on the same inputs. Returns (ratio, extra seconds per
    call: median of the per-round differences, and their min, max) and the timings."""
    times, _, _ = interleaved(variants, device, repeats=repeats, calls=calls, warmup=2)
    diffs = [a - b for a, b in zip(times[other], times[base])]
    extra = median(diffs)
    return 1 + extra / full_base_seconds, extra, (min(diffs), max(diffs)), times


def verdict(ratios: list[float], target: float) -> str:
    """"pass" / "FAIL" on the median ratio, or "noisy" when the rounds disagree (some above the target,
    some at or below it) by more than twice the margin (target - 1): then the machine's noise, not the
    model, decides the median."""
    if min(ratios) <= target < max(ratios) and max(ratios) - min(ratios) > 2 * (target - 1):
        return "noisy"
    return "pass" if median(ratios) <= target else "FAIL"


def ddpm_scheduler():
    """SD 1.5's training noise schedule (its scheduler config), built without a download."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon")


def make_trainable(unet, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """As helpers.train: the UNet frozen in `dtype`, the adapter's parameters (helpers.model.adapter_file's
    adapter_parameters, including the text-image block when it is attached) trainable in fp32."""
    from helpers.model.official_format import adapter_parameters

    unet.requires_grad_(False)
    params = adapter_parameters(unet)
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    unet.train()
    return params


class AdapterStep:
    """One optimiser step on the adapter as helpers.train does it: loss (the caller's closure, run under
    autocast when the frozen weights are half precision), backward, gradient clipping at 1.0, AdamW
    (lr 1e-4, weight decay 0.01); with a GradScaler for fp16."""

    def __init__(self, params: dict[str, torch.nn.Parameter], device: torch.device, dtype: torch.dtype):
        self.params = list(params.values())
        self.device, self.dtype = device, dtype
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        fp16 = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None

    def __call__(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = loss_fn()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def run_estimate_lines(step_seconds: dict[str, float], *, batch: int, train_images: int, epochs: int,
                       device: torch.device) -> list[str]:
    """What a full training run would take at the measured step times: an estimate, not a measurement."""
    steps = math.ceil(train_images / batch) * epochs
    lines = []
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = f"ESTIMATE (not a measurement) on this GPU, {name}"
    else:
        label = "ESTIMATE (not a measurement), CPU, not a T4 estimate"
    lines.append(f"{label}: {epochs} epochs x ceil({train_images} / batch {batch}) = {steps} steps at the measured "
                 "median step time:")
    for variant, s in step_seconds.items():
        hours = f" ({steps * s / 3600:.1f} h)" if steps * s > 7200 else ""
        lines.append(f"  {variant:<22} {s:.3f} s/step -> {steps * s / 60:.1f} min{hours}")
    if device.type == "cuda":
        ratio = t4_slowdown(torch.cuda.get_device_name(device))
        if ratio is None:
            lines.append("  (no T4 scaling: this GPU is not in the fp16-rate table)")
        elif ratio != 1.0:
            lines.append(f"  ROUGH T4 ESTIMATE: x{ratio:.1f} (ratio of peak dense fp16 tensor rates, NVIDIA datasheets); "
                         "a T4 usually reaches a lower fraction of its peak, so read it as optimistic:")
            for variant, s in step_seconds.items():
                lines.append(f"  {variant:<22} {s * ratio:.3f} s/step -> {steps * s * ratio / 60:.1f} min on a T4 "
                             "(estimate)")
    return lines


# Peak dense fp16 tensor-core rates, TFLOPS (NVIDIA datasheets; SXM parts where there are two). The longest
# name wins, so "L40S" is not read as "L4", nor "H100 PCIe" as "H100".
_FP16_TFLOPS = {"T4": 65, "V100": 125, "A100": 312, "L4": 121, "L40": 181, "L40S": 362,
                "H100": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200": 989}


def fp16_peak_tflops(gpu_name: str) -> float | None:
    """The GPU's peak dense fp16 tensor-core rate in TFLOPS (the table above; the longest name that the GPU's
    name contains), or None for a GPU not in the table."""
    for key in sorted(_FP16_TFLOPS, key=len, reverse=True):
        if key.lower() in gpu_name.lower():
            return _FP16_TFLOPS[key]
    return None


def t4_slowdown(gpu_name: str) -> float | None:
    peak = fp16_peak_tflops(gpu_name)
    return None if peak is None else peak / _FP16_TFLOPS["T4"]
