"""helpers.support.launch: what notebooks 03 and 05 share to start `accelerate launch -m helpers.<module>` from a
cell as a subprocess: its environment, its output streamed into the cell, an interrupt that stops every process."""
import io
import os
import sys
import time
from pathlib import Path

import pytest

from helpers.support.launch import accelerate_command, environment, failure, shown, stream


def test_the_launched_processes_import_this_checkout_s_helpers_whatever_the_working_folder():
    assert environment()["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[2])


def test_the_command_is_accelerate_launch_and_what_a_terminal_would_type():
    cmd = accelerate_command("helpers.evaluate", ["--out-dir", "my eval"], 2, port=29999)
    assert cmd[:6] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    assert cmd[-4:] == ["-m", "helpers.evaluate", "--out-dir", "my eval"]
    assert shown(cmd).startswith("accelerate launch --multi_gpu --num_processes 2 ")
    assert shown(cmd).endswith("-m helpers.evaluate --out-dir 'my eval'")


def test_a_failed_launch_says_the_command_s_own_error_line_else_its_last_lines():
    assert failure(1, "50%\rerror: no room for x\n", "grid on 2 processes") == "no room for x (grid on 2 processes)"
    said = failure(3, "Traceback\nSegfault\n", "grid on 2 processes", then="Run it again.")
    assert said == ("grid on 2 processes stopped (exit status 3) without a result. Its last lines:\nTraceback\n"
                    "Segfault\nThe full output is above. Run it again.")


def test_an_interrupt_stops_every_process_of_the_launch(tmp_path):
    """The notebook's stop button raises KeyboardInterrupt in the cell: the launch and the processes it
    started (its session) get SIGINT and are gone when the interrupt reaches the notebook."""
    pids = tmp_path / "pids"
    script = ("import os, subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); print('ready', flush=True); "
              "time.sleep(600)")

    class Cell(io.StringIO):
        def write(self, text):
            if "ready" in text:
                raise KeyboardInterrupt
            return super().write(text)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stream([sys.executable, "-c", script], dict(os.environ), Cell())
    assert time.monotonic() - started < 60
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        assert not _alive(pid), f"process {pid} of the launch still runs"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has ended (its parent reaps it)
    except (FileNotFoundError, IndexError):
        return False
