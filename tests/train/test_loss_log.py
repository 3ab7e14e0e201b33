"""helpers.train.loss_log: an append-only log, rewritten only whole; a cut last line dropped with a word, any
other bad line reported with its file and line number; a full disk named."""
import errno

import pytest

import helpers.train.loss_log as loss_log_module
from helpers.support.disk import DiskFull
from helpers.train.errors import TrainingError
from helpers.train.loss_log import LOSS_LOG, LossLog, read_loss_log, truncate_log


def logged(tmp_path, steps):
    log = LossLog(tmp_path, 0)
    for step in steps:
        log.add(step, 0, 1.0 / step, 0.5)
    log.flush()
    return tmp_path / LOSS_LOG


def test_a_resume_cuts_the_rows_past_its_checkpoint_in_one_atomic_rewrite(tmp_path, monkeypatch):
    path = logged(tmp_path, range(1, 2001))
    real_write, written = loss_log_module.write_text, []

    def interrupted(target, text, **kw):  # the interrupt comes while the new log is written
        written.append(target)
        raise KeyboardInterrupt

    monkeypatch.setattr(loss_log_module, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        truncate_log(path, 1500)
    assert written == [path] and len(read_loss_log(tmp_path)) == 2000  # the old log, whole (was: 0 rows)
    monkeypatch.setattr(loss_log_module, "write_text", real_write)
    truncate_log(path, 1500)
    assert [r["step"] for r in read_loss_log(tmp_path)] == list(range(1, 1501))


def test_a_cut_last_line_is_dropped_with_a_line_saying_so(tmp_path):
    path = logged(tmp_path, range(1, 5))
    path.write_bytes(path.read_bytes() + b"5,0,0.2")  # the process died while appending step 5
    said = []
    assert [r["step"] for r in read_loss_log(tmp_path, say=said.append)] == [1, 2, 3, 4]
    assert said == [f"{path}, line 6: cut off ('5,0,0.2', no end of line: the run stopped while appending it); "
                    "dropped. The run writes that step again."]
    LossLog(tmp_path, 4, say=said.append).flush()
    assert path.read_bytes().endswith(b"4,0,0.250000,0.5000\r\n")  # rewritten without it


@pytest.mark.parametrize("bad, why", [("3,0,abc,0.5", "could not convert string to float: 'abc'"),
                                      ("3,0,0.3", "3 values, not 4")])
def test_a_malformed_line_is_reported_with_file_and_line_not_dropped(tmp_path, bad, why):
    path = logged(tmp_path, range(1, 5))
    lines = path.read_text().splitlines()
    lines[3] = bad
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    message = rf"{path}, line 4: '{bad}' is not a row of step,epoch,loss,seconds \({why}\)\. Correct or delete that line"
    with pytest.raises(TrainingError, match=message):
        read_loss_log(tmp_path)
    with pytest.raises(TrainingError, match=message):  # a resume stops too, and leaves the file as it was
        LossLog(tmp_path, 2)
    assert path.read_bytes() == before


def test_a_full_disk_while_appending_names_the_loss_log(tmp_path, monkeypatch):
    log = LossLog(tmp_path, 0)
    log.add(1, 0, 0.5, 0.1)

    class FullFile:
        def __init__(self, *args, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loss_log_module, "open", FullFile, raising=False)
    with pytest.raises(DiskFull, match=rf"The disk is full: could not write the loss log \({tmp_path / LOSS_LOG}\)"):
        log.flush()
