"""Training on every GPU from a notebook: `accelerate launch -m helpers.train ...`, started as a subprocess.

    result = train_on_all_gpus(config)        # > 1 GPU: one process per GPU; else train(config) right here
    cmd = launch_command(config, 2)           # the command it runs (a terminal runs the same)

Why a subprocess and not `accelerate.notebook_launcher`: notebook_launcher refuses once the notebook holds an
Accelerator or has initialised CUDA, and notebook 03's look-inside cell does both (prepare_run). A subprocess
starts fresh processes whatever the kernel holds, runs the command line that the tests run (under
`accelerate launch` with two CPU processes and gloo), and a crash or an out-of-memory error in it leaves
the notebook's kernel as it was.

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

import codecs
import collections
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ..profile import get_profile
from .config import TrainConfig, batch_plan, config_args, recipe, run_profile
from .errors import TrainingError
from .loop import TrainResult, train

# the Profile fields a training run reads that the command line does not carry (the recipe's it does)
PROFILE_FIELDS = ("base_model", "ip_adapter", "image_encoder", "captioner", "dataset", "resolution", "test_fraction",
                  "feature_batch_size", "random_weights", "segmenter", "mask_threshold", "mask_background_weight")
RESULT_FLAG = "--result-file"  # python -m helpers.train: where the main process writes its TrainResult (JSON)


def gpu_count() -> int:
    """The CUDA GPUs this machine shows (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", choose_mixed_precision(config.mixed_precision),
           "--dynamo_backend", "no", "--main_process_port", str(port or free_port()),
           "-m", "helpers.train", *config_args(config)]
    return cmd + ([RESULT_FLAG, str(result_file)] if result_file else [])


def launch(config: TrainConfig, num_processes: int, *, out=None) -> TrainResult:
    """Run launch_command(config, num_processes) as a subprocess, its output streamed to `out` (default:
    sys.stdout, the cell), and return the TrainResult its main process wrote. Raises TrainingError naming the
    run's own error, or with the output's last lines; an interrupt stops every process and is re-raised."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="ipa-launch-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = launch_command(config, num_processes, result_file=result_file)
        shown = "accelerate launch " + shlex.join(cmd[3:-2])  # what a terminal would run (no result file)
        print(f"Training on {num_processes} processes: {shown}", file=out, flush=True)
        code, tail = _stream(cmd, _environment(), out)
        if code != 0 or not result_file.is_file():
            raise TrainingError(_failure(code, tail, num_processes))
        return read_result(result_file)


def free_port() -> int:
    """A TCP port free on this machine now, for the launch's rendezvous (another launch may hold 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_result(path, result: TrainResult) -> None:
    """Save a TrainResult as JSON (the main process of a launch, for the notebook that started it)."""
    from ..support.atomic import write_json

    write_json(Path(path), {**dataclasses.asdict(result), "adapter": str(result.adapter)})


def read_result(path) -> TrainResult:
    """The TrainResult write_result saved."""
    values = json.loads(Path(path).read_text())
    return TrainResult(**{**values, "adapter": Path(values["adapter"])})


def _environment() -> dict:
    """This process's environment, with the folder this `helpers` comes from first on PYTHONPATH (a checkout;
    an installed copy is found anyway): the launched processes import the same code as the notebook, whatever
    its working folder."""
    root = str(Path(__file__).resolve().parents[2])
    if Path(root).name in ("site-packages", "dist-packages"):
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _stream(cmd: list[str], env: dict, out) -> tuple[int, str]:
    """Run cmd, copying its stdout and stderr to `out` as they come (progress bars' carriage returns
    included: a notebook redraws the bar in place). Returns (exit status, the last 8000 characters)."""
    tail = collections.deque(maxlen=8000)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while chunk := proc.stdout.read1(1 << 16):
            text = decoder.decode(chunk)
            out.write(text)
            out.flush()
            tail.extend(text)
        out.write(decoder.decode(b"", final=True))
        return proc.wait(), "".join(tail)
    except BaseException:  # the notebook's stop button (KeyboardInterrupt), or anything else: stop them all
        _stop(proc)
        raise
    finally:
        proc.stdout.close()


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a launch and every process it started (its own session): SIGINT, so the runs release their lock;
    SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(code: int, tail: str, n: int) -> str:
    """What TrainingError says when a launch failed: the run's own `error: ...` line if it printed one."""
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    ours = next((line.removeprefix("error: ") for line in lines if line.startswith("error: ")), None)
    if ours:
        return f"{ours} (training on {n} processes)"
    last = "\n".join(lines[-25:])
    return (f"training on {n} processes stopped (exit status {code}) without a result. Its last lines:\n{last}\n"
            "The full output is above. Run the same cell again to resume from the last checkpoint once fixed.")
