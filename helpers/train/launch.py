"""Training on every GPU from a notebook: `accelerate launch -m helpers.train ...`, started as a subprocess.

    result = train_on_all_gpus(config)        # > 1 GPU: one process per GPU; else train(config) right here
    cmd = launch_command(config, 2)           # the command it runs (a terminal runs the same)

Why a subprocess and not `accelerate.notebook_launcher`: helpers.support.launch (notebook 03's look-inside cell
has made an Accelerator and initialised CUDA by then, which notebook_launcher refuses).

The command carries the TrainConfig whole (helpers.train.config.config_args): the profile by its name, which
each process resolves again, and every recipe value written out, so the notebook's overrides travel too.
Profile fields the command line cannot carry must be the same in a freshly resolved profile: they are
checked before anything starts (`check_profile_travels`). The batch is the recipe's global batch
(helpers.train.config.batch_plan): a process count that does not divide it is refused here, before launch.

The subprocess's output (the main process's progress bar and messages) streams into the cell as it comes;
the main process writes its TrainResult to a temporary file that becomes this function's return value. A
run that stops raises TrainingError with the run's own `error: ...` line (or the output's last lines); an
interrupt (the notebook's stop button) stops every process of the launch and re-raises.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from ..profile import get_profile
from ..support.launch import accelerate_command, environment, failure, gpu_count, shown, stream
from .config import TrainConfig, batch_plan, config_args, recipe, run_profile
from .errors import TrainingError
from .loop import TrainResult, train

# the Profile fields a training run reads that the command line does not carry (the recipe's it does)
PROFILE_FIELDS = ("base_model", "ip_adapter", "image_encoder", "captioner", "dataset", "resolution", "test_fraction",
                  "feature_batch_size", "random_weights", "segmenter", "mask_threshold", "mask_background_weight")
RESULT_FLAG = "--result-file"  # python -m helpers.train: where the main process writes its TrainResult (JSON)


def train_on_all_gpus(config: TrainConfig, gpus: int | None = None, *, out=None) -> TrainResult:
    """Train `config` on every GPU: with more than one (`gpus`, default: all this machine has), one process
    per GPU through `accelerate launch` (launch); with one or none, train(config) in this process, as
    before. Returns the main process's TrainResult. Raises TrainingError when the run cannot go on."""
    gpus = gpu_count() if gpus is None else gpus
    if gpus <= 1:
        return train(config)
    return launch(config, gpus, out=out)


def check_profile_travels(config: TrainConfig) -> None:
    """Raise TrainingError unless the profile that each launched process resolves from the profile's name
    (in this environment: $IPA_RESOLUTION and the like are inherited) equals config's on PROFILE_FIELDS."""
    mine = run_profile(config, announce=False)
    theirs = get_profile(mine.name, announce=False)
    differ = [f"{f} {getattr(mine, f)!r} here, {getattr(theirs, f)!r} there" for f in PROFILE_FIELDS
              if getattr(mine, f) != getattr(theirs, f)]
    if differ:
        raise TrainingError(
            f"the launched processes resolve --profile {mine.name} afresh, and these settings of this notebook's "
            f"profile would not travel: {'; '.join(differ)}. Set them through the environment before the notebook "
            "starts (IPA_RESOLUTION, ...), or train in this process: train(config).")


def launch_command(config: TrainConfig, num_processes: int, *, port: int | None = None,
                   result_file=None) -> list[str]:
    """The command that trains `config` on `num_processes` processes (one per GPU):
    [python, -m, accelerate.commands.launch, --multi_gpu, --num_processes, N, ..., -m, helpers.train, <flags>]
    with the flags of config_args(config). `--multi_gpu` is torchrun underneath; without CUDA (the tests) the
    processes run on the CPU with gloo (the run's Accelerator(cpu=True)), where `--cpu` would start only
    one. Raises TrainingError for a process count that does not divide the global batch, or a profile that
    would not travel (check_profile_travels)."""
    from ..support.device import choose_mixed_precision

    profile = run_profile(config, announce=False)
    r = recipe(config, profile)
    try:
        batch_plan(r["batch_size"], r["learning_rate"], num_processes, config.scale_batch_with_gpus)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    check_profile_travels(config)
    args = config_args(config) + ([RESULT_FLAG, str(result_file)] if result_file else [])
    return accelerate_command("helpers.train", args, num_processes,
                              mixed_precision=choose_mixed_precision(config.mixed_precision), port=port)


def launch(config: TrainConfig, num_processes: int, *, out=None) -> TrainResult:
    """Run launch_command(config, num_processes) as a subprocess, its output streamed to `out` (default:
    sys.stdout, the cell), and return the TrainResult its main process wrote. Raises TrainingError naming the
    run's own error, or with the output's last lines; an interrupt stops every process and is re-raised."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="ipa-launch-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = launch_command(config, num_processes, result_file=result_file)
        print(f"Training on {num_processes} processes: {shown(cmd[:-2])}", file=out, flush=True)  # no result file
        code, tail = stream(cmd, environment(), out)
        if code != 0 or not result_file.is_file():
            raise TrainingError(failure(code, tail, f"training on {num_processes} processes",
                                        then="Run the same cell again to resume from the last checkpoint once fixed."))
        return read_result(result_file)


def write_result(path, result: TrainResult) -> None:
    """Save a TrainResult as JSON (the main process of a launch, for the notebook that started it)."""
    from ..support.atomic import write_json

    write_json(Path(path), {**dataclasses.asdict(result), "adapter": str(result.adapter)})


def read_result(path) -> TrainResult:
    """The TrainResult write_result saved."""
    values = json.loads(Path(path).read_text())
    return TrainResult(**{**values, "adapter": Path(values["adapter"])})
