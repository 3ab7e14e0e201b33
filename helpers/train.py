"""Fine-tune IP-Adapter Plus, vanilla or text-aware, from cached features, with Accelerate.

    result = train(TrainConfig(output_dir=DIR, variant="text_aware"))   # setup, resume, steps, checkpoints

    python -m helpers.train --profile tiny|full --variant vanilla|text_aware --output-dir DIR \\
           [--max-steps N] [--checkpoint-every K] [--seed S] [--batch-size B] [--epochs E] ...
           [--pairing self|mirror|neighbour [--pairing-self-prob P]]

The recipe is the seed project's, the same for both variants so that the comparison isolates the
architecture: batch 4, 6 epochs, 512 px, AdamW lr 1e-4, weight decay 0.01, and IP-Adapter's condition
dropout (text 5%, image 5%, both 5%; a dropped image uses the features of a zero image, as diffusers does
at inference). It starts from the pretrained IP-Adapter Plus weights (the text-image block at zero).
The reference each target is conditioned on is the target itself (`self`, the seed's objective), or with
--pairing its mirror or its nearest other drawing (helpers.pairing; the pairs go to DIR/pairs.json).

Trainable: the Resampler, every to_k_ip / to_v_ip, and (text-aware) the text-image block, in fp32. Frozen:
the UNet (fp16 on a T4, bf16 on Ampere+, fp32 on a CPU). The VAE and both encoders never run here: training
reads notebook 01's feature cache (built first if missing) and samples each latent from the cached VAE
distribution.

Every K steps a checkpoint is written atomically under DIR/checkpoints/; running the same command again
resumes from the newest one (exactly: the data order, noise and dropout of each step depend only on the
seed and the step; helpers.checkpoints). The final adapter goes to DIR/adapter.safetensors (helpers.adapter format), with
DIR/config.json and the per-step DIR/loss_log.csv beside it. Under `torchrun`/`accelerate launch` the same
code runs data-parallel; only the main process writes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import load_unet
from .adapter_file import ADAPTER_FILE, adapter_parameters, save_adapter
from .checkpoints import CheckpointMismatch, list_checkpoints, load_checkpoint, save_checkpoint
from .env import in_colab, output_root
from .features import load_feature_cache, prepare_for_training
from .loss import DROP_RATES, diffusion_loss, epoch_order, make_batch
from .pairing import PAIRINGS, PairingError, run_pairs
from .profile import get_profile

LOSS_LOG = "loss_log.csv"


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); the message says what to change."""


@dataclass
class TrainConfig:
    output_dir: str
    variant: str = "text_aware"
    profile: str = "auto"
    data_dir: str | None = None  # default: <output root>/data (notebook 01's folder)
    batch_size: int | None = None  # None: the profile's (4)
    epochs: int | None = None  # None: the profile's (6)
    max_steps: int | None = None  # None: the profile's, else epochs over the training split
    learning_rate: float | None = None
    weight_decay: float | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    mixed_precision: str = "auto"  # auto: fp16 on a T4 (no native bf16), bf16 on Ampere+, no on a CPU
    gradient_checkpointing: bool | None = None
    max_grad_norm: float = 1.0
    keep_checkpoints: int = 2
    pairing: str = "self"  # self | mirror | neighbour (helpers.pairing)
    pairing_self_prob: float | None = None  # mirror/neighbour: fraction of samples kept self; None: 0.25


def choose_mixed_precision(requested: str = "auto") -> str:
    """fp16 below compute capability 8 (a T4 reports bf16 support, but only by emulation), bf16 from
    Ampere on, "no" on a CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


# --------------------------------------------------------------------------------------------------
# The training function, in named steps: setup, resume, one step, checkpoint
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the steps of one training run share, built once by `setup`."""

    config: TrainConfig
    accelerator: object  # accelerate.Accelerator
    profile: object  # helpers.profile.Profile
    out: Path
    feats: dict[str, torch.Tensor]  # the feature cache (helpers.features), fp16 on the CPU
    batch_size: int  # per process
    steps_per_epoch: int
    max_steps: int
    every: int  # checkpoint interval in steps
    model: torch.nn.Module  # the UNet as Accelerate prepared it
    params: dict[str, torch.nn.Parameter]  # adapter_parameters(unet): what the optimizer updates, in fp32
    optimizer: torch.optim.Optimizer
    scheduler: object  # diffusers DDPMScheduler
    scaling: float  # the VAE's latent scaling factor
    settings: dict = dataclasses.field(default_factory=dict)  # config.json: every value this run uses
    pairs: object = None  # helpers.pairing.Pairs; None: self pairing


def setup(config: TrainConfig, *, progress: bool = True) -> Run:
    """Data and feature cache (built if missing), the UNet with the adapter (trainable in fp32, the rest frozen
    in the mixed-precision dtype), AdamW and the noise scheduler, prepared by Accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    mp = choose_mixed_precision(config.mixed_precision)
    # cpu=True without a GPU: then torchrun gives Accelerate a multi-CPU (gloo) run instead of N lone ones
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    main = accelerator.is_main_process
    profile = get_profile(config.profile, announce=main)
    batch_size = config.batch_size or profile.train_batch_size
    lr = config.learning_rate or profile.learning_rate
    wd = profile.weight_decay if config.weight_decay is None else config.weight_decay
    data_dir = Path(config.data_dir) if config.data_dir else output_root(colab=in_colab(), drive=False) / "data"

    with accelerator.main_process_first():  # the main process builds data and cache; the others then read them
        prep, cache_path = prepare_for_training(profile, data_dir, progress=progress and main)
    feats, cache_meta = load_feature_cache(cache_path)
    try:
        with accelerator.main_process_first():  # the main process makes and saves the pairs; the others read them
            pairs = run_pairs(config.pairing, config.pairing_self_prob, Path(config.output_dir), profile, prep,
                              cache_path, feats, cache_meta, write=main, progress=progress and main)
    except PairingError as e:
        raise TrainingError(str(e)) from None
    n = feats["image_embeds"].shape[0]
    steps_per_epoch = math.ceil(n / (batch_size * accelerator.num_processes))
    max_steps = config.max_steps or profile.max_train_steps or (config.epochs or profile.num_epochs) * steps_per_epoch

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    unet = load_unet(profile.base_model, profile.ip_adapter, variant=config.variant,
                     image_encoder_dim=feats["image_embeds"].shape[-1], device=accelerator.device, dtype=weight_dtype)
    unet.requires_grad_(False)
    params = adapter_parameters(unet)
    for p in params.values():
        p.data = p.data.float()  # trainable weights stay fp32 (GradScaler needs them so)
        p.requires_grad_(True)
    use_ckpt = profile.gradient_checkpointing if config.gradient_checkpointing is None else config.gradient_checkpointing
    if use_ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=wd)
    model, optimizer = accelerator.prepare(unet, optimizer)
    every = config.checkpoint_every or profile.checkpoint_every
    settings = {**dataclasses.asdict(config), "batch_size": batch_size, "learning_rate": lr, "weight_decay": wd,
                "checkpoint_every": every, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch,
                "train_images": n, "mixed_precision": mp, "gradient_checkpointing": use_ckpt,
                "profile": profile.name, "base_model": profile.base_model, "ip_adapter": profile.ip_adapter,
                "drop_rates": DROP_RATES, "num_processes": accelerator.num_processes,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "pairing_self_prob": pairs.self_prob if pairs else None, "pairing_rule": pairs.rule if pairs else None}
    return Run(config, accelerator, profile, Path(config.output_dir), feats, batch_size, steps_per_epoch, max_steps,
               every, model, params, optimizer, DDPMScheduler.from_pretrained(profile.base_model, subfolder="scheduler"),
               _vae_scaling_factor(profile.base_model), settings, pairs)


def resume(run: Run) -> int:
    """Load the newest complete checkpoint of run.out, if any (and say so); returns the step to start from."""
    found = list_checkpoints(run.out)
    if not found:
        return 0
    start, path = found[-1]
    try:
        state = load_checkpoint(path, run.params, run.optimizer)
    except CheckpointMismatch as e:
        raise TrainingError(str(e)) from None
    if state.get("scaler") and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    if run.accelerator.is_main_process:
        print(f"Resuming from {path} (step {start} of {run.max_steps}).")
    return start


def step_batch(run: Run, step: int) -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """This process's batch for `step`, with text and image dropped out, on the device, and the generator that
    then draws the step's noise. Both depend only on the seed, the step and the process: a resumed run sees
    exactly what an uninterrupted one sees.

    batch: latent_mean, latent_std (B, 4, r/8, r/8); text_embeds (B, 77, C); image_embeds (B, 257, 1280), the
    features of each row's reference (helpers.pairing; self pairing: the row's own)
    """
    acc, feats, b = run.accelerator, run.feats, run.batch_size
    global_batch = b * acc.num_processes
    epoch, pos = divmod(step, run.steps_per_epoch)
    rows = epoch_order(len(feats["image_embeds"]), epoch, run.config.seed, global_batch)[pos * global_batch:(pos + 1) * global_batch]
    rows = rows[acc.process_index * b:(acc.process_index + 1) * b]
    g = torch.Generator().manual_seed(run.config.seed * 1_000_003 + step * 1_009 + acc.process_index)
    refs = None if run.pairs is None else run.pairs.references(feats, rows, seed=run.config.seed, step=step,
                                                                 process=acc.process_index)
    batch = make_batch(feats, rows, g, references=refs)
    return {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}, g


def training_step(run: Run, step: int) -> float:
    """One optimizer step (step counts from 0): the loss of this process's batch, backward, clip, update.
    Returns the loss. Raises TrainingError on a non-finite loss or when the GPU runs out of memory."""
    batch, g = step_batch(run, step)
    try:
        loss = diffusion_loss(run.model, run.scheduler, batch, g, run.scaling)
        if not torch.isfinite(loss):
            last = list_checkpoints(run.out)
            raise TrainingError(
                f"the loss became {loss.item()} at step {step + 1}; stopped. The last good checkpoint is "
                f"{last[-1][1] if last else 'none (no checkpoint written yet)'}. Try a lower --learning-rate, "
                "or --mixed-precision no to rule out fp16 overflow.")
        run.accelerator.backward(loss)
        if run.accelerator.sync_gradients and run.config.max_grad_norm:
            run.accelerator.clip_grad_norm_(list(run.params.values()), run.config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory at batch size {run.batch_size} ({run.settings['mixed_precision']}). Lower "
            "--batch-size (e.g. 2) or turn on --gradient-checkpointing (about 30% slower, far less activation "
            "memory); free other notebooks' GPU memory (Runtime > Restart) first.") from None
    return loss.detach().float().item()


def checkpoint(run: Run, step: int) -> None:
    """Every run.every steps and at the end: all processes wait, the main one writes the checkpoint."""
    if step % run.every and step != run.max_steps:
        return
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        scaler = run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None
        save_checkpoint(run.out, step, run.params, run.optimizer, scaler, run.config.keep_checkpoints)


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    losses: list[float]  # the losses of this process's steps in this call
    seconds_per_step: float  # median over this call's steps (the first ones excluded when there are many)
    total_seconds: float
    peak_gpu_memory_gib: float | None  # None on a CPU
    mixed_precision: str


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train one adapter as configured; resumes from DIR's newest checkpoint. Returns a TrainResult."""
    from tqdm.auto import tqdm

    run = setup(config, progress=progress)
    main = run.accelerator.is_main_process
    start = resume(run)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(run.settings, indent=2))
        _truncate_log(run.out / LOSS_LOG, start)
    losses, times = [], []
    t_start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bar = tqdm(total=run.max_steps, initial=start, disable=not (progress and main), desc=f"train {config.variant}",
               unit="step")
    step = start
    try:
        while step < run.max_steps:
            t0 = time.perf_counter()
            value = training_step(run, step)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            step += 1
            losses.append(value)
            if main:
                with open(run.out / LOSS_LOG, "a", newline="") as f:
                    csv.writer(f).writerow([step, (step - 1) // run.steps_per_epoch, f"{value:.6f}", f"{times[-1]:.4f}"])
                bar.set_postfix(loss=f"{value:.4f}", s_per_step=f"{times[-1]:.2f}")
            bar.update(1)
            checkpoint(run, step)
    finally:
        bar.close()
    run.accelerator.wait_for_everyone()
    adapter_path = run.out / ADAPTER_FILE
    if main:
        save_adapter(run.accelerator.unwrap_model(run.model), adapter_path,
                     metadata={"base_model": run.profile.base_model, "training_config": run.settings})
    steady = times[2:] if len(times) > 5 else times
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return TrainResult(adapter=adapter_path, steps=step, resumed_from=start, losses=losses,
                       seconds_per_step=float(sorted(steady)[len(steady) // 2]) if steady else float("nan"),
                       total_seconds=time.perf_counter() - t_start, peak_gpu_memory_gib=peak,
                       mixed_precision=run.settings["mixed_precision"])


def _vae_scaling_factor(base_model) -> float:
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(base_model, subfolder="vae").get("scaling_factor", 0.18215))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the loss log's rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= step]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "seconds"])
        w.writerows(rows)


def read_loss_log(output_dir) -> list[dict]:
    """The per-step loss log of a run: [{"step", "epoch", "loss", "seconds"}, ...]."""
    path = Path(output_dir) / LOSS_LOG
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "loss": float(r["loss"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(f)]


def main(argv=None) -> TrainResult:
    ap = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--variant", default="text_aware", choices=["vanilla", "text_aware"])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--data-dir", default=None, help="notebook 01's output folder (default: <output root>/data)")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--learning-rate", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true", default=None)
    ap.add_argument("--pairing", default="self", choices=PAIRINGS,
                    help="the reference of each target: itself (default), its mirror, or its nearest other drawing")
    ap.add_argument("--pairing-self-prob", type=float, default=None,
                    help="mirror/neighbour: fraction of samples that keep their own image (default 0.25)")
    args = ap.parse_args(argv)
    config = TrainConfig(**{k: v for k, v in vars(args).items()})
    try:
        result = train(config)
    except TrainingError as e:
        raise SystemExit(f"error: {e}") from None
    if result.adapter.is_file():
        print(f"Wrote {result.adapter} after {result.steps} steps ({result.seconds_per_step:.2f} s/step).")
    return result



if __name__ == "__main__":
    main()
