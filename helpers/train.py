"""Fine-tune IP-Adapter Plus, vanilla or text-aware, from cached features, with Accelerate.

    python -m helpers.train --profile tiny|full --variant vanilla|text_aware --output-dir DIR \\
           [--max-steps N] [--checkpoint-every K] [--seed S] [--batch-size B] [--epochs E] ...

The recipe is the seed project's, the same for both variants so that the comparison isolates the
architecture: batch 4, 6 epochs, 512 px, AdamW lr 1e-4, weight decay 0.01, and IP-Adapter's condition
dropout (text 5%, image 5%, both 5%; a dropped image uses the features of a zero image, as diffusers does
at inference). It starts from the pretrained IP-Adapter Plus weights (the text-image block at zero).

Trainable: the Resampler, every to_k_ip / to_v_ip, and (text-aware) the text-image block, in fp32. Frozen:
the UNet (fp16 on a T4, bf16 on Ampere+, fp32 on a CPU). The VAE and both encoders never run here: training
reads notebook 01's feature cache (built first if missing) and samples each latent from the cached VAE
distribution.

Every K steps a checkpoint is written atomically under DIR/checkpoints/; running the same command again
resumes from the newest one (exactly: the data order, noise and dropout of each step depend only on the
seed and the step). The final adapter goes to DIR/adapter.safetensors (helpers.adapter format), with
DIR/config.json and the per-step DIR/loss_log.csv beside it. Under `torchrun`/`accelerate launch` the same
code runs data-parallel; only the main process writes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DROP_RATES = {"text": 0.05, "image": 0.05, "both": 0.05}  # IP-Adapter's training recipe
CHECKPOINTS = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
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


def choose_mixed_precision(requested: str = "auto") -> str:
    """fp16 below compute capability 8 (a T4 reports bf16 support, but only by emulation), bf16 from
    Ampere on, "no" on a CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


def drop_masks(n: int, generator: torch.Generator, rates=DROP_RATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which their image: one draw per sample, so the three cases
    (text only, image only, both) are exclusive, with the given rates. Returns two bool tensors (n,)."""
    r = torch.rand(n, generator=generator)
    t, i, b = rates["text"], rates["image"], rates["both"]
    drop_text = (r < t) | ((r >= t + i) & (r < t + i + b))
    drop_image = ((r >= t) & (r < t + i + b))
    return drop_text, drop_image


def epoch_order(n: int, epoch: int, seed: int, global_batch: int) -> torch.Tensor:
    """The sample order of one epoch, padded by wrap-around to a multiple of the global batch."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    pad = (-n) % global_batch
    return torch.cat([perm, perm[:pad]]) if pad else perm


def trainable_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by name: Resampler (encoder_hid_proj), to_k_ip / to_v_ip, text_image_attn."""
    names = {}
    for name, p in unet.named_parameters():
        if name.startswith(("encoder_hid_proj.", "text_image_attn.")) or ".to_k_ip." in name or ".to_v_ip." in name:
            names[name] = p
    return names


def diffusion_loss(unet, scheduler, batch: dict, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """The denoising loss of one batch (the same UNet call as sampling: text states plus image features
    through `added_cond_kwargs["image_embeds"]`).

    batch: latent_mean, latent_std (B,4,h,w); text_embeds (B,77,C); image_embeds (B,257,1280), already
    dropped out where needed. Noise and timesteps come from `generator` (CPU), so a step is reproducible.
    """
    mean, std = batch["latent_mean"], batch["latent_std"]
    device = mean.device
    eps_latent = torch.randn(mean.shape, generator=generator).to(device)
    latents = (mean.float() + std.float() * eps_latent) * scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    weight_dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    pred = unet(noisy.to(weight_dtype), t, encoder_hidden_states=batch["text_embeds"].to(weight_dtype),
                added_cond_kwargs={"image_embeds": [batch["image_embeds"].to(weight_dtype)[:, None]]}).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


# --------------------------------------------------------------------------------------------------
# Checkpoints: trainable weights (safetensors), optimizer + scaler state, step; written to a temporary
# folder and renamed, so a folder named ckpt-NNNNNN is always complete.
# --------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    folder = output_dir / CHECKPOINTS
    found = []
    for p in folder.glob("ckpt-*") if folder.is_dir() else []:
        if p.is_dir() and p.name[5:].isdigit() and (p / "trainable.safetensors").is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def _save_checkpoint(output_dir: Path, step: int, params: dict, optimizer, scaler_state, keep: int) -> Path:
    from safetensors.torch import save_file

    folder = output_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{step:06d}"
    tmp = folder / f".tmp-ckpt-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler_state, "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, params: dict, optimizer) -> dict:
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    if saved.keys() != params.keys():
        raise TrainingError(f"{path}: its weights do not match this model ({len(saved)} tensors vs {len(params)}); "
                            "was it written by another variant? Use another --output-dir.")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state


# --------------------------------------------------------------------------------------------------
# The training function
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    losses: list[float]  # the losses of this process's steps in this call
    seconds_per_step: float  # median over this call's steps (the first ones excluded when there are many)
    total_seconds: float
    peak_gpu_memory_gib: float | None
    mixed_precision: str
    model: torch.nn.Module | None = dataclasses.field(default=None, repr=False)  # the trained UNet (main process)


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train one adapter as configured; resumes from DIR's newest checkpoint. Returns a TrainResult."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from .adapter import load_unet, save_adapter
    from .data import load_feature_cache, prepare_for_training
    from .env import in_colab, output_root
    from .profile import get_profile

    from accelerate.utils import set_seed

    mp = choose_mixed_precision(config.mixed_precision)
    # cpu=True without a GPU: then torchrun gives Accelerate a multi-CPU (gloo) run instead of N lone ones
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    main = accelerator.is_main_process
    profile = get_profile(config.profile, announce=main)
    batch_size = config.batch_size or profile.train_batch_size
    lr = config.learning_rate or profile.learning_rate
    wd = profile.weight_decay if config.weight_decay is None else config.weight_decay
    every = config.checkpoint_every or profile.checkpoint_every
    out = Path(config.output_dir)
    data_dir = Path(config.data_dir) if config.data_dir else output_root(colab=in_colab(), drive=False) / "data"

    with accelerator.main_process_first():  # the main process builds data and cache; the others then read them
        _, cache_path = prepare_for_training(profile, data_dir, progress=progress and main)
    feats, _ = load_feature_cache(cache_path)
    n = feats["image_embeds"].shape[0]
    global_batch = batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(n / global_batch)
    epochs = config.epochs or profile.num_epochs
    max_steps = config.max_steps or profile.max_train_steps or epochs * steps_per_epoch

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    unet = load_unet(profile.base_model, profile.ip_adapter, variant=config.variant,
                     image_encoder_dim=feats["image_embeds"].shape[-1], device=accelerator.device, dtype=weight_dtype)
    unet.requires_grad_(False)
    params = trainable_parameters(unet)
    for p in params.values():
        p.data = p.data.float()  # trainable weights stay fp32 (GradScaler needs them so)
        p.requires_grad_(True)
    use_ckpt = profile.gradient_checkpointing if config.gradient_checkpointing is None else config.gradient_checkpointing
    if use_ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=wd)
    scheduler = DDPMScheduler.from_pretrained(profile.base_model, subfolder="scheduler")
    model, optimizer = accelerator.prepare(unet, optimizer)

    start = 0
    found = _checkpoints(out)
    if found:
        start, path = found[-1]
        state = _load_checkpoint(path, params, optimizer)
        if state.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        if main:
            print(f"Resuming from {path} (step {start} of {max_steps}).")
    run_config = {**dataclasses.asdict(config), "batch_size": batch_size, "learning_rate": lr, "weight_decay": wd,
                  "checkpoint_every": every, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch,
                  "train_images": n, "mixed_precision": mp, "gradient_checkpointing": use_ckpt,
                  "profile": profile.name, "base_model": profile.base_model, "ip_adapter": profile.ip_adapter,
                  "drop_rates": DROP_RATES, "num_processes": accelerator.num_processes,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(run_config, indent=2))
        _truncate_log(out / LOSS_LOG, start)

    null_text, null_image = feats["null_text_embeds"], feats["null_image_embeds"]
    scaling = _vae_scaling_factor(profile.base_model)
    losses, times = [], []
    t_start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bar = tqdm(total=max_steps, initial=start, disable=not (progress and main), desc=f"train {config.variant}",
               unit="step")
    step = start
    try:
        while step < max_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            order = epoch_order(n, epoch, config.seed, global_batch)
            rows = order[pos * global_batch:(pos + 1) * global_batch]
            rows = rows[accelerator.process_index * batch_size:(accelerator.process_index + 1) * batch_size]
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009 + accelerator.process_index)
            drop_text, drop_image = drop_masks(len(rows), g)
            batch = {
                "latent_mean": feats["latent_mean"][rows],
                "latent_std": feats["latent_std"][rows],
                "text_embeds": torch.where(drop_text[:, None, None], null_text, feats["text_embeds"][rows]),
                "image_embeds": torch.where(drop_image[:, None, None], null_image, feats["image_embeds"][rows]),
            }
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            t0 = time.perf_counter()
            try:
                loss = diffusion_loss(model, scheduler, batch, g, scaling)
                if not torch.isfinite(loss):
                    last = _checkpoints(out)
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step + 1}; stopped. The last good checkpoint is "
                        f"{last[-1][1] if last else 'none (no checkpoint written yet)'}. Try a lower --learning-rate, "
                        "or --mixed-precision no to rule out fp16 overflow.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            except torch.cuda.OutOfMemoryError:
                raise TrainingError(
                    f"out of GPU memory at batch size {batch_size} ({mp}). Lower --batch-size (e.g. 2) or turn on "
                    "--gradient-checkpointing (about 30% slower, far less activation memory); free other "
                    "notebooks' GPU memory (Runtime > Restart) first.") from None
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            step += 1
            value = loss.detach().float().item()
            losses.append(value)
            if main:
                with open(out / LOSS_LOG, "a", newline="") as f:
                    csv.writer(f).writerow([step, epoch, f"{value:.6f}", f"{times[-1]:.4f}"])
                bar.set_postfix(loss=f"{value:.4f}", s_per_step=f"{times[-1]:.2f}")
            bar.update(1)
            if step % every == 0 or step == max_steps:
                accelerator.wait_for_everyone()
                if main:
                    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
                    _save_checkpoint(out, step, params, optimizer, scaler, config.keep_checkpoints)
    finally:
        bar.close()
    accelerator.wait_for_everyone()
    adapter_path = out / ADAPTER_FILE
    if main:
        final = accelerator.unwrap_model(model)
        save_adapter(final, adapter_path, metadata={"base_model": profile.base_model, "training_config": run_config})
    steady = times[2:] if len(times) > 5 else times
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return TrainResult(adapter=adapter_path, steps=step, resumed_from=start, losses=losses,
                       seconds_per_step=float(sorted(steady)[len(steady) // 2]) if steady else float("nan"),
                       total_seconds=time.perf_counter() - t_start, peak_gpu_memory_gib=peak, mixed_precision=mp,
                       model=accelerator.unwrap_model(model))


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
