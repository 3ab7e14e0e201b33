"""Notebook 03: fine-tune the adapter with Accelerate (`python -m helpers.train`, or train(TrainConfig(...))).

On more than one GPU, notebook 03 trains on all of them through `accelerate launch -m helpers.train`, started
as a subprocess (launch.py): `accelerate.notebook_launcher` refuses once the notebook holds an Accelerator,
which 03's look-inside cell creates, while the subprocess runs the tested command line whatever the kernel
holds. The batch is the recipe's global batch, split over the processes (config.batch_plan).

    loss.py         the objective: condition dropout, the epoch's order, the denoising loss
    pairing.py      which reference each target is conditioned on: self, mirror or neighbour
    masking.py      training on the character: the reference's background filled, the loss weighted by the mask
    config.py       TrainConfig, the recipe's values against the profile, the command line, config.json
    run.py          what a run holds, built once (prepare_run), resumed, released
    step.py         one training step, and the checkpoint every K steps
    loop.py         train(): the steps in a loop with a progress bar; the final adapter
    launch.py       train_on_all_gpus(): the same run on every GPU, `accelerate launch` as a subprocess
    checkpoints.py  checkpoints that survive a cut Drive sync, verified by sha256, pruned to make room; an exact resume
    loss_log.py     the per-step loss log (append-only, rewritten atomically), and its plot
    errors.py       TrainingError: a run that cannot go on, with the file and what to do
"""


def __getattr__(name):  # the entry points, imported on first use
    if name in ("train", "TrainResult"):
        from . import loop

        return getattr(loop, name)
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
