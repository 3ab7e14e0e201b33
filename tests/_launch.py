"""Test support for launches of several processes: two CPU processes under torchrun (gloo) standing in for two
GPUs, and the mark that keeps these tests in one of CI's two test parts (./run.sh test; test-colab sets
IPA_TEST_PART=colab), as each launch costs seconds of start-up."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

one_test_part = pytest.mark.skipif(os.environ.get("IPA_TEST_PART") == "colab",
                                   reason="two-process launches run in ./run.sh test only (CI time)")


def free_port() -> str:
    """A free TCP port for the launch's rendezvous: another run of the suite (the Colab-versions venv) may hold one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(*args, processes: int = 2, check: bool = True, **env) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --nproc_per_node N ARGS (a script or -m module), one thread each, from the
    repository root; check: its exit status must be 0 (else the end of its output is the failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", free_port(), *map(str, args)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # this checkout's helpers
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check:
        assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc


def as_process(monkeypatch, rank: int, world: int) -> None:
    """Make this (lone) process act as process `rank` of `world` in helpers.support.ranks, the others absent:
    waiting for them returns at once and from_main gives its own value. For a killed launch's leftovers."""
    from helpers.support import ranks

    monkeypatch.setattr(ranks, "world_size", lambda: world)
    monkeypatch.setattr(ranks, "rank", lambda: rank)
    monkeypatch.setattr(ranks, "wait_for_everyone", lambda: None)
    monkeypatch.setattr(ranks, "from_main", lambda value: value)
