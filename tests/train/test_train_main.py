"""python -m helpers.train: a run that cannot go on ends with `error: <message>`, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

import helpers.train.loop as loop_module
from helpers.data.features import FeatureCacheError
from helpers.data.prepare import PreparedDataDamaged, PreparedDataMismatch
from helpers.support.disk import DiskFull
from helpers.support.loading import LoadError
from helpers.support.lock import FolderInUse
from helpers.train.__main__ import main

STOPS = [FolderInUse("/runs/text_aware is in use by pid 12 on host (notebook 03) since 10:00: wait"),
         DiskFull("no room for /runs/text_aware/checkpoints/ckpt-000004 (3 MB free, 9 MB needed): free some space"),
         PreparedDataMismatch("/data holds data prepared at 64 px; you asked for 128: rerun notebook 01"),
         PreparedDataDamaged("/data/prepared-1/train/data.arrow cannot be read: rerun notebook 01"),
         FeatureCacheError("out of GPU memory caching features at batch 16: set feature_batch_size = 4"),
         LoadError("base model /models/sd15 is not in the cache and the Hub is offline: unset HF_HUB_OFFLINE")]


@pytest.mark.parametrize("error", STOPS, ids=lambda e: type(e).__name__)
def test_a_run_that_cannot_go_on_says_error_and_its_message(error, tmp_path, monkeypatch):
    def fail(config, **kw):  # inside train(): the folder's lock is held, as when the data or the model fail
        raise error

    monkeypatch.setattr(loop_module, "prepare_run", fail)
    with pytest.raises(SystemExit) as stop:
        main(["--profile", "tiny", "--output-dir", str(tmp_path / "run")])
    assert stop.value.code == f"error: {error}"  # a string: Python prints it to stderr, exit status 1


SCRIPT = """
import sys
import helpers.train.loop as loop
from helpers.data.features import FeatureCacheError

def fail(config, **kw):
    raise FeatureCacheError("out of GPU memory caching features at batch 16: set feature_batch_size = 4")

loop.prepare_run = fail
from helpers.train.__main__ import main
main(sys.argv[1:])
"""


def test_the_command_prints_one_error_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "--profile", "tiny", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: out of GPU memory caching features at batch 16: "
                                                    "set feature_batch_size = 4")
