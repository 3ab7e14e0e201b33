"""helpers.support.disk: a full disk named as such, before and during a write."""

import errno
import shutil
from collections import namedtuple

import pytest
import torch

from helpers.support import disk
from helpers.support.atomic import write_text
from helpers.support.disk import DiskFull, check_space, disk_errors, is_disk_full

Usage = namedtuple("Usage", "total used free")


def test_check_space_names_the_folder_and_both_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 0, 300 * 2**20))
    check_space(tmp_path, 200 * 2**20, what="a checkpoint")
    with pytest.raises(DiskFull) as e:
        check_space(tmp_path / "not" / "yet", 600 * 2**20, what="a checkpoint")
    msg = str(e.value)
    assert str(tmp_path) in msg and "300 MB free" in msg and "600 MB needed" in msg and "trash" in msg
    assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
    Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"),
])
def test_each_librarys_words_for_a_full_disk_are_recognised(exc):
    assert is_disk_full(exc)


def test_other_errors_pass_untouched(tmp_path):
    with pytest.raises(KeyError):
        with disk_errors(tmp_path / "f"):
            raise KeyError("x")
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))


def test_a_full_disk_during_torch_save_names_the_file(tmp_path, monkeypatch):
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "state.pt"
    with pytest.raises(DiskFull, match="could not write .*state.pt"):
        with disk_errors(target):
            torch.save({}, target)


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_text(tmp_path / "summary.csv", "old\n")
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".tmp-" + str(__import__("os").getpid())):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFull, match="summary.csv"):
        write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]
    assert disk.free_bytes(tmp_path / "a" / "b") > 0
