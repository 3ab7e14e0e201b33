"""Fine-tune IP-Adapter Plus, vanilla or text-aware, from cached features, with Accelerate.

    result = train(TrainConfig(output_dir=DIR, variant="text_aware"))   # prepare, resume, steps, checkpoints

    python -m helpers.train --profile tiny|full --variant vanilla|text_aware --output-dir DIR \\
           [--max-steps N] [--checkpoint-every K] [--seed S] [--batch-size B] [--epochs E] ...
           [--pairing self|mirror|neighbour [--pairing-self-prob P]] [--mask none|reference|loss|both]

The recipe is the seed project's, the same for both variants so that the comparison isolates the
architecture (helpers.profile holds its values; notebook 03 shows them). It starts from the pretrained
IP-Adapter Plus weights (the text-image block at zero). Trainable: the Resampler, every to_k_ip / to_v_ip,
and (text-aware) the text-image block, in fp32; the UNet stays frozen in the mixed-precision dtype. The VAE
and both encoders never run here: training reads notebook 01's feature cache and samples each latent from the
cached VAE distribution. The data is notebook 01's prepared folder as it is (--data-dir, default <output
root>/data; helpers.data.prepare.use_prepared).

Every K steps a checkpoint is written under DIR/checkpoints/ (helpers.train.checkpoints); running the same
command again resumes from the newest complete one, verified, exactly. The final adapter goes to
DIR/adapter.safetensors, with DIR/config.json and DIR/loss_log.csv (helpers.train.loss_log) beside it. Nothing
of a run stays in memory after train() returns (TrainResult holds numbers and a path). Under
`torchrun`/`accelerate launch` the same code runs data-parallel; only the main process writes. --batch-size is
the global batch, split over the processes (helpers.train.config.batch_plan); notebook 03 starts such a launch
on every GPU (helpers.train.launch).

Faults: a run holds DIR's lock (helpers.support.lock) from before a fresh start until its adapter is written,
so a second writer on DIR (notebook 03 and `python -m helpers.train`) stops at once, and temporaries that a
killed run left there are removed. Before training, the disk must have room for one checkpoint and the
adapter (counting what pruning old checkpoints would free); each save makes room or stops. A full disk, a
folder in use and a damaged loss log each end the run with a TrainingError that names the file or folder;
what was complete before stays complete, and the same command run again continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.adapter_file import ADAPTER_FILE, save_adapter
from ..support.disk import DiskFull
from ..support.lock import FolderInUse, FolderLock
from .checkpoints import adapter_bytes, checkpoint_room, list_checkpoints, make_room
from .config import TrainConfig, write_run_settings
from .loss_log import LossLog
from .run import Run, TrainingError, drop_frames, prepare_run, release, resume
from .step import save_checkpoint_if_due, training_step


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
    deletes the earlier run first), holding DIR's lock throughout. Returns a TrainResult. Raises TrainingError
    for a folder in use, a full disk (naming the file or folder) and the faults of helpers.train.step.
    Everything the run put on the device is freed before this returns, also when it fails or is interrupted."""
    run = None
    try:
        with FolderLock(config.output_dir, f"training {config.variant}") as lock:  # before a fresh start deletes
            run = prepare_run(config, progress=progress)
            run.lock = lock
            return _train(run, progress)
    except (DiskFull, FolderInUse) as e:
        drop_frames(e)
        raise TrainingError(str(e)) from None
    except BaseException as e:
        drop_frames(e)  # a kept traceback (a notebook keeps the last one) would hold the run's tensors
        raise
    finally:
        release(run)


def _train(run: Run, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    config, main = run.config, run.accelerator.is_main_process
    start = resume(run)
    if main:
        n = run.settings["trainable_parameters"]
        make_room(run.out, (checkpoint_room(n) if start < run.max_steps else 0) + adapter_bytes(n),
                  config.keep_checkpoints, what="this run (one checkpoint and the adapter)", prune=False)
        write_run_settings(run.out, run.settings)
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
            run.lock.beat()  # at most every lock.BEAT_SECONDS: on Drive each write is an upload
            if main:
                bar.set_postfix(loss=f"{value:.4f}", s_per_step=f"{times[-1]:.2f}")
            bar.update(1)
            save_checkpoint_if_due(run, step)
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
