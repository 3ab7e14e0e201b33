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

The data is notebook 01's prepared folder as it is (--data-dir, default <output root>/data; helpers.data.
use_prepared): your own images if 01 prepared those. It is prepared from the profile's dataset only when
missing, and never overwritten; --dataset / --resolution / --test-fraction, if given, must match it.

Every K steps a checkpoint is written atomically under DIR/checkpoints/; running the same command again
resumes from the newest complete one (exactly: the data order, noise and dropout of each step depend only on
the seed and the step; helpers.checkpoints). An incomplete newest checkpoint (a cut Drive sync) falls back to
the one before; a rerun whose variant, batch size, learning rate, seed or data differs from the checkpoint's
refuses and says how to start over (--fresh-start). The final adapter goes to DIR/adapter.safetensors
(helpers.adapter format), with DIR/config.json and the per-step DIR/loss_log.csv (helpers.loss_log, written at
checkpoints) beside it. Nothing of a run stays in memory after train() returns (TrainResult holds numbers and
a path). Under `torchrun`/`accelerate launch` the same code runs data-parallel; only the main process writes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import load_unet
from .adapter_file import ADAPTER_FILE, adapter_parameters, save_adapter
from .checkpoints import (CheckpointMismatch, SettingsMismatch, delete_checkpoints, list_checkpoints, resume_from,
                          save_checkpoint)
from .data import DataSourceError, PreparedDataMismatch
from .env import in_colab, output_root
from .features import load_feature_cache, prepare_for_training
from .loss import DROP_RATES, diffusion_loss, epoch_order, make_batch
from .loss_log import LOSS_LOG, LossLog, read_loss_log  # noqa: F401  (read_loss_log: public here)
from .pairing import PAIRS_FILE, PairingError, run_pairs
from .profile import get_profile
from .train_config import (RESUME_SETTINGS, TrainConfig, choose_mixed_precision, max_steps,  # noqa: F401  (public here)
                           parse_config, recipe)

RUN_FILES = (LOSS_LOG, ADAPTER_FILE, "config.json", PAIRS_FILE)  # what a fresh start deletes, besides the checkpoints


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); the message says what to change."""


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
    log: LossLog | None = None  # the buffered loss log (train() makes it once the start step is known)
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
    profile = get_profile(config.profile, announce=main)  # the models and the recipe's defaults; the data is data_dir's
    try:
        r = recipe(config, profile)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    data_dir = Path(config.data_dir) if config.data_dir else output_root(colab=in_colab(), drive=False) / "data"

    with accelerator.main_process_first():  # the main process builds data and cache; the others then read them
        prep, cache_path = prepare_for_training(profile, data_dir, progress=progress and main, announce=main,
                                                dataset=config.dataset, resolution=config.resolution,
                                                test_fraction=config.test_fraction)
    feats, cache_meta = load_feature_cache(cache_path)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # this run's own peak: from here on (the cache step freed its models)
    if config.fresh_start:  # before the pairs: a fresh start may change the pairing
        if main:
            print(start_over(Path(config.output_dir)))
        accelerator.wait_for_everyone()
    try:
        with accelerator.main_process_first():  # the main process makes and saves the pairs; the others read them
            pairs = run_pairs(config.pairing, config.pairing_self_prob, Path(config.output_dir), profile, prep,
                              cache_path, feats, cache_meta, write=main, progress=progress and main)
    except PairingError as e:
        raise TrainingError(str(e)) from None
    n = feats["image_embeds"].shape[0]
    steps_per_epoch = math.ceil(n / (r["batch_size"] * accelerator.num_processes))
    steps = max_steps(config, profile, steps_per_epoch)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    unet = load_unet(profile.base_model, profile.ip_adapter, variant=config.variant,
                     image_encoder_dim=feats["image_embeds"].shape[-1], device=accelerator.device, dtype=weight_dtype)
    unet.requires_grad_(False)
    params = adapter_parameters(unet)
    for p in params.values():
        p.data = p.data.float()  # trainable weights stay fp32 (GradScaler needs them so)
        p.requires_grad_(True)
    if r["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(list(params.values()), lr=r["learning_rate"], weight_decay=r["weight_decay"])
    model, optimizer = accelerator.prepare(unet, optimizer)
    del unet
    settings = {**dataclasses.asdict(config), **r, "max_steps": steps, "steps_per_epoch": steps_per_epoch,
                "train_images": n, "data": cache_meta["fingerprint"][:16], "data_dir": str(data_dir),
                "data_source": prep.info.get("source"), "resolution": prep.info.get("resolution"),
                "test_fraction": prep.info.get("test_fraction"),
                "trainable_parameters": sum(p.numel() for p in params.values()), "mixed_precision": mp,
                "profile": profile.name, "base_model": profile.base_model, "ip_adapter": profile.ip_adapter,
                "drop_rates": DROP_RATES, "num_processes": accelerator.num_processes,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "pairing_self_prob": pairs.self_prob if pairs else None, "pairing_rule": pairs.rule if pairs else None}
    return Run(config, accelerator, profile, Path(config.output_dir), feats, r["batch_size"], steps_per_epoch, steps,
               r["checkpoint_every"], model, params, optimizer, DDPMScheduler.from_pretrained(profile.base_model, subfolder="scheduler"),
               _vae_scaling_factor(profile.base_model), settings, pairs=pairs)


def resume(run: Run) -> int:
    """Load the newest complete checkpoint of run.out, if any (and say so); returns the step to start from.
    An incomplete newest one falls back to the one before, with a message; one written with other
    RESUME_SETTINGS than this run's raises TrainingError naming each difference (helpers.checkpoints.resume_from)."""
    main = run.accelerator.is_main_process
    try:
        step, path, state = resume_from(run.out, run.settings, RESUME_SETTINGS, run.params, run.optimizer,
                                        say=print if main else (lambda _: None))
    except (CheckpointMismatch, SettingsMismatch) as e:
        raise TrainingError(str(e)) from None
    if path is None:
        return 0
    if state.get("scaler") and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    if main:
        print(f"Resuming from {path} (step {step} of {run.max_steps}).")
    return step


def start_over(out: Path) -> str:
    """Delete a run folder's checkpoints, loss log, adapter and config (a fresh start); says what went."""
    gone = [f"{p.name} ({size / 2**20:,.0f} MiB)" for p, size in delete_checkpoints(out)]
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            gone.append(name)
    if not gone:
        return f"Fresh start in {out} (nothing there to delete)."
    return (f"Fresh start: deleted the earlier run's {', '.join(gone)} in {out} (on Google Drive they go to the "
            "trash, which counts against your quota until you empty it). Turn FRESH_START off again, or a rerun "
            "after a disconnect deletes this run too.")


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
    """Every run.every steps and at the end: all processes wait, the main one appends the buffered loss log
    and then writes the checkpoint (with the settings a resume must share)."""
    if step % run.every and step != run.max_steps:
        return
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.log.flush()  # first: a checkpoint never exists without its loss rows
        scaler = run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None
        save_checkpoint(run.out, step, run.params, run.optimizer, scaler, run.config.keep_checkpoints,
                        settings={k: run.settings.get(k) for k in RESUME_SETTINGS})


@dataclass
class TrainResult:
    """What a run leaves behind: a path and numbers, never the model, optimizer or caches (those are freed)."""

    adapter: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    losses: list[float]  # the losses of this process's steps in this call
    seconds_per_step: float  # median over this call's steps (the first ones excluded when there are many)
    total_seconds: float
    peak_gpu_memory_gib: float | None  # this run's own peak (stats reset after the data step); None on a CPU
    mixed_precision: str
    trainable_parameters: int = 0
    checkpoint_bytes: int = 0  # size of the newest checkpoint on disk (0 if none)


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train one adapter as configured; resumes from DIR's newest complete checkpoint (config.fresh_start:
    deletes the earlier run first). Returns a TrainResult. Everything the run put on the device is freed
    before this returns, also when it fails or is interrupted."""
    run = None
    try:
        run = setup(config, progress=progress)
        return _train(run, progress)
    except BaseException as e:
        _drop_frames(e)  # a kept traceback (a notebook keeps the last one) would hold the run's tensors
        raise
    finally:
        release(run)


def _train(run: Run, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    config, main = run.config, run.accelerator.is_main_process
    start = resume(run)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(run.settings, indent=2))
    run.log = LossLog(run.out, start, enabled=main)
    losses, times = [], []
    t_start = time.perf_counter()
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
            run.log.add(step, (step - 1) // run.steps_per_epoch, value, times[-1])
            if main:
                bar.set_postfix(loss=f"{value:.4f}", s_per_step=f"{times[-1]:.2f}")
            bar.update(1)
            checkpoint(run, step)
    finally:
        bar.close()
        run.log.flush()  # an interrupted run keeps its rows; a resume cuts those past its checkpoint
    run.accelerator.wait_for_everyone()
    adapter_path = run.out / ADAPTER_FILE
    if main:
        save_adapter(run.accelerator.unwrap_model(run.model), adapter_path,
                     metadata={"base_model": run.profile.base_model, "training_config": run.settings})
    steady = times[2:] if len(times) > 5 else times
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    newest = list_checkpoints(run.out)
    return TrainResult(adapter=adapter_path, steps=step, resumed_from=start, losses=losses,
                       seconds_per_step=float(sorted(steady)[len(steady) // 2]) if steady else float("nan"),
                       total_seconds=time.perf_counter() - t_start, peak_gpu_memory_gib=peak,
                       mixed_precision=run.settings["mixed_precision"],
                       trainable_parameters=run.settings["trainable_parameters"],
                       checkpoint_bytes=sum(f.stat().st_size for f in newest[-1][1].iterdir()) if newest else 0)


def release(run: Run | None) -> None:
    """Drop everything a run holds (model, optimizer, parameters, feature cache, Accelerate's references to
    them), collect, and empty the CUDA cache, so that the next run starts from an empty device."""
    if run is not None:
        run.accelerator.free_memory()
        run.accelerator.scaler = None
        run.model = run.optimizer = run.params = run.feats = run.scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _drop_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in an exception's traceback and in those of the
    exceptions it chains (an out-of-memory error's frames hold the step's activations)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _vae_scaling_factor(base_model) -> float:
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(base_model, subfolder="vae").get("scaling_factor", 0.18215))


def main(argv=None) -> TrainResult:
    config = parse_config(argv, description=__doc__.split("\n\n")[0])
    try:
        result = train(config)
    except (TrainingError, PreparedDataMismatch, DataSourceError) as e:
        raise SystemExit(f"error: {e}") from None
    if result.adapter.is_file():
        print(f"Wrote {result.adapter} after {result.steps} steps ({result.seconds_per_step:.2f} s/step).")
    return result


if __name__ == "__main__":
    main()
