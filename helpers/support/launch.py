"""Starting `accelerate launch -m <helpers module> ...` from a notebook cell, one process per GPU, as a subprocess:
what notebook 03's training (helpers.train.launch) and notebook 05's grid (helpers.evaluate.launch) share.

    cmd = accelerate_command("helpers.evaluate", args, 2)   # [python, -m, accelerate.commands.launch, ...]
    code, tail = stream(cmd, environment(), sys.stdout)     # its output into the cell as it comes

Why a subprocess and not `accelerate.notebook_launcher`: notebook_launcher refuses once the notebook holds an
Accelerator or has initialised CUDA, and both notebooks have done so by then (03's look-inside cell, 05's model
bank). A subprocess starts fresh processes whatever the kernel holds, runs the command line a terminal and the
tests run (two CPU processes with gloo stand in for two GPUs), and a crash or an out-of-memory error in it
leaves the notebook's kernel as it was. An interrupt (the notebook's stop button) stops every process of the
launch (SIGINT, so each releases its folder's lock; SIGKILL after a grace period) and is raised again.
"""

from __future__ import annotations

import codecs
import collections
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path


def gpu_count() -> int:
    """The CUDA GPUs this machine shows (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def accelerate_command(module: str, args: list[str], num_processes: int, *, mixed_precision: str = "no",
                       port: int | None = None) -> list[str]:
    """[python, -m, accelerate.commands.launch, --multi_gpu, --num_processes, N, ..., -m, module, *args].
    `--multi_gpu` is torchrun underneath; without CUDA (the tests) the processes run on the CPU with gloo
    (helpers.support.ranks), where `--cpu` would start only one."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", str(port or free_port()), "-m", module, *args]


def shown(cmd: list[str]) -> str:
    """What a terminal would type for accelerate_command's cmd: "accelerate launch --multi_gpu ..."."""
    return "accelerate launch " + shlex.join(cmd[3:])


def free_port() -> int:
    """A TCP port free on this machine now, for the launch's rendezvous (another launch may hold 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict:
    """This process's environment, with the folder this `helpers` comes from first on PYTHONPATH (a checkout;
    an installed copy is found anyway): the launched processes import the same code as the notebook, whatever
    its working folder."""
    root = str(Path(__file__).resolve().parents[2])
    if Path(root).name in ("site-packages", "dist-packages"):
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def stream(cmd: list[str], env: dict, out) -> tuple[int, str]:
    """Run cmd, copying its stdout and stderr to `out` as they come (progress bars' carriage returns
    included: a notebook redraws the bar in place). Returns (exit status, the last 8000 characters). An
    exception while it runs (KeyboardInterrupt: the stop button) stops it and all it started (stop)."""
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
        stop(proc)
        raise
    finally:
        proc.stdout.close()


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a launch and every process it started (its own session): SIGINT, so the processes release their
    lock; SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def failure(code: int, tail: str, what: str, *, prefix: str = "error: ",
            then: str = "Run the same cell again to resume once fixed.") -> str:
    """What to raise when a launch failed: the command's own `error: ...` line if it printed one (" (what)"
    appended), else its last lines and `then`. what: e.g. "training on 2 processes"."""
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    ours = next((line.removeprefix(prefix) for line in lines if line.startswith(prefix)), None)
    if ours:
        return f"{ours} ({what})"
    last = "\n".join(lines[-25:])
    return (f"{what} stopped (exit status {code}) without a result. Its last lines:\n{last}\n"
            f"The full output is above. {then}")
