"""One training step: this process's batch (the data, dropout and noise of the step depend only on the seed,
the step and the process, so a resumed run repeats an uninterrupted one exactly), the loss, backward, clip,
update; and the checkpoint every K steps.

    loss = training_step(run, step)      # run: helpers.train.run.prepare_run(config)
    save_checkpoint_if_due(run, step)
"""

from __future__ import annotations

import torch

from .checkpoints import list_checkpoints, save_checkpoint
from .config import RESUME_SETTINGS
from .loss import diffusion_loss, epoch_order, make_batch
from .run import Run, TrainingError


def step_batch(run: Run, step: int) -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """This process's batch for `step`, with text and image dropped out, on the device, and the generator that
    then draws the step's noise. Both depend only on the seed, the step and the process: a resumed run sees
    exactly what an uninterrupted one sees.

    batch: latent_mean, latent_std (B, 4, r/8, r/8); text_embeds (B, 77, C); image_embeds (B, 257, 1280), the
    features of each row's reference (helpers.train.pairing; self pairing: the row's own; MASK reference or
    both: of the reference with its background filled); MASK loss or both: latent_mask (B, r/8, r/8), each
    target row's mask at latent size (helpers.train.masking)
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
    if run.masking is not None and run.masking.loss_masks is not None:
        batch["latent_mask"] = run.masking.loss_masks[rows]  # the targets' (rows), whatever the reference
    return {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}, g


def training_step(run: Run, step: int) -> float:
    """One optimizer step (step counts from 0): the loss of this process's batch, backward, clip, update.
    Returns the loss. Raises TrainingError on a non-finite loss or when the GPU runs out of memory."""
    batch, g = step_batch(run, step)
    try:
        loss = diffusion_loss(run.model, run.scheduler, batch, g, run.scaling,
                              background_weight=run.masking.background_weight if run.masking else None)
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
        raise TrainingError(out_of_memory_advice(run, step)) from None
    return loss.detach().float().item()


def out_of_memory_advice(run: Run, step: int) -> str:
    """What to do when a step runs out of GPU memory, saying which change a resume accepts: gradient
    checkpointing (not in RESUME_SETTINGS) keeps the run; a batch size (in them) needs a fresh start."""
    last = list_checkpoints(run.out)
    where = f"it resumes from {last[-1][1].name}" if last else "with no checkpoint yet, it starts from step 0"
    batch = ("A smaller batch (--batch-size, BATCH_SIZE) changes the recipe, which a resume refuses: it needs "
             "--fresh-start (FRESH_START in notebook 03), which deletes this run's checkpoints.")
    if run.settings.get("gradient_checkpointing"):
        knob = f"Gradient checkpointing is on already. {batch}"
    else:
        knob = ("Turn on gradient checkpointing (--gradient-checkpointing, GRADIENT_CHECKPOINTING in notebook 03; "
                f"about 30% slower, far less activation memory) and run the same command again: a resume accepts "
                f"it, and {where}. {batch}")
    return (f"out of GPU memory at step {step + 1}, batch size {run.batch_size} per process "
            f"({run.settings['mixed_precision']}). {knob} Free other notebooks' GPU memory first "
            "(Runtime > Restart session).")


def save_checkpoint_if_due(run: Run, step: int) -> None:
    """Every run.every steps and at the end: all processes wait, the main one refreshes the run folder's lock,
    appends the buffered loss log and then writes the checkpoint (with the settings a resume must share),
    making room first by pruning old checkpoints if it must (helpers.train.checkpoints.save_checkpoint)."""
    if step % run.every and step != run.max_steps:
        return
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        if run.lock is not None:
            run.lock.beat(force=True)  # stops here if another writer took the folder over meanwhile
        run.log.flush()  # first: a checkpoint never exists without its loss rows
        scaler = run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None
        save_checkpoint(run.out, step, run.params, run.optimizer, scaler, run.config.keep_checkpoints,
                        settings={k: run.settings.get(k) for k in RESUME_SETTINGS})
