"""helpers.support.lock: one writer per folder, a stale lock taken over, ranks of one launch sharing it."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from helpers.support import lock as lockmod
from helpers.support.lock import LOCK_FILE, FolderInUse, FolderLock, clean_temporaries, read_lock


def _other_process_holds(folder, seconds=30):
    """Start a process that takes the folder's lock and holds it; returns the Popen once the lock exists."""
    code = textwrap.dedent(f"""
        import time
        from helpers.support.lock import FolderLock
        with FolderLock({str(folder)!r}, "a test writer"):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "WORLD_SIZE": "1"})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_stops_at_once_naming_the_first(tmp_path):
    p = _other_process_holds(tmp_path)
    try:
        with pytest.raises(FolderInUse) as e:
            FolderLock(tmp_path, "notebook 05").acquire()
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and "a test writer" in msg and "last seen" in msg and "IPA_BREAK_LOCK" in msg
    finally:
        p.kill()
        p.wait()


def test_a_writer_killed_on_this_machine_leaves_a_lock_taken_over_at_once(tmp_path):
    p = _other_process_holds(tmp_path)
    p.kill()  # kill -9: its lock stays, with a fresh heartbeat
    p.wait()
    assert read_lock(tmp_path)["pid"] == p.pid
    said = []
    with FolderLock(tmp_path, say=said.append):  # same host, process gone: stale at once
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "process is gone" in said[0] and f"pid {p.pid}" in said[0]
    assert not (tmp_path / LOCK_FILE).exists()


def test_another_hosts_lock_goes_stale_only_by_its_heartbeat(tmp_path):
    """After a Colab disconnect the new machine has another host name, and the old pid means nothing here."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"owner": "vm-1/pid/999999", "pid": 999999, "host": "vm-1",
                                                  "since": time.time(), "seen": time.time()}))
    with pytest.raises(FolderInUse, match="pid 999999 on vm-1"):
        FolderLock(tmp_path).acquire()
    said = []
    with FolderLock(tmp_path, stale_after=0.0, say=said.append):  # older than the stated age: stale
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "stale" in said[0]


def test_the_setting_overrides_a_live_lock(tmp_path, monkeypatch):
    p = _other_process_holds(tmp_path)
    try:
        monkeypatch.setenv("IPA_BREAK_LOCK", "1")
        said = []
        with FolderLock(tmp_path, say=said.append):
            assert read_lock(tmp_path)["pid"] == os.getpid()
        assert "forced" in said[0]
    finally:
        p.kill()
        p.wait()


def test_the_stale_age_is_a_setting(tmp_path, monkeypatch):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"owner": "elsewhere/pid/1", "pid": 1, "host": "elsewhere",
                                                  "since": time.time() - 600, "seen": time.time() - 120}))
    monkeypatch.setenv("IPA_LOCK_STALE_MINUTES", "5")
    with pytest.raises(FolderInUse, match="last seen 2 min ago"):
        FolderLock(tmp_path).acquire()
    monkeypatch.setenv("IPA_LOCK_STALE_MINUTES", "1")
    with FolderLock(tmp_path, say=lambda _: None):
        assert read_lock(tmp_path)["host"] != "elsewhere"


def test_a_writer_taken_over_while_silent_stops_at_its_next_beat(tmp_path, monkeypatch):
    with FolderLock(tmp_path) as mine:
        info = read_lock(tmp_path)
        (tmp_path / LOCK_FILE).write_text(json.dumps({**info, "owner": "other/pid/2", "pid": 2, "host": "other"}))
        with pytest.raises(FolderInUse, match="taken over"):
            mine.beat(force=True)


def test_beat_refreshes_the_heartbeat_and_keeps_since(tmp_path):
    with FolderLock(tmp_path) as lock:
        first = read_lock(tmp_path)
        time.sleep(0.05)
        lock.beat()  # within BEAT_SECONDS: no write
        assert read_lock(tmp_path) == first
        lock.beat(force=True)
        now = read_lock(tmp_path)
        assert now["seen"] > first["seen"] and now["since"] == first["since"]


def test_nested_entries_of_one_process_share_the_lock(tmp_path):
    with FolderLock(tmp_path):
        with FolderLock(tmp_path):
            pass
        assert (tmp_path / LOCK_FILE).exists()  # the inner exit left the outer's lock
    assert not (tmp_path / LOCK_FILE).exists()


def test_ranks_of_one_launch_share_one_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-1")
    monkeypatch.setenv("RANK", "1")
    rank1 = FolderLock(tmp_path).acquire()  # rank 1 first: it creates the launch's lock
    monkeypatch.setenv("RANK", "0")
    with FolderLock(tmp_path):  # rank 0 enters the same lock
        assert read_lock(tmp_path)["owner"].endswith("/launch/run-1")
    monkeypatch.setenv("RANK", "1")
    rank1.release()
    assert not (tmp_path / LOCK_FILE).exists()  # the main rank gave it back
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-2")  # another launch is another writer
    FolderLock(tmp_path).acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-3")
    with pytest.raises(FolderInUse):
        FolderLock(tmp_path).acquire()


def test_taking_the_lock_removes_every_temporary_left_behind(tmp_path):
    (tmp_path / "checkpoints" / ".ckpt-000010.tmp-4242").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".ckpt-000010.tmp-4242" / "state.pt").write_bytes(b"x" * 10)
    (tmp_path / ".results.csv.tmp-77").write_text("half")
    (tmp_path / ".train.old-77").mkdir()
    (tmp_path / ".prepare-abc").mkdir()
    (tmp_path / "keep.csv").write_text("whole")
    (tmp_path / ".share-rank1.tmp-9").write_text("not merged")
    with FolderLock(tmp_path, keep={".share-rank1.tmp-9"}):
        pass
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == [".share-rank1.tmp-9", "checkpoints", "keep.csv"]
    assert clean_temporaries(tmp_path / "missing") == []


def test_an_unreadable_lock_file_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod.time, "sleep", lambda s: None)
    (tmp_path / LOCK_FILE).write_text('{"owner": "x", "pi')  # a cut write
    said = []
    with FolderLock(tmp_path, say=said.append):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "unreadable" in said[0]


def _second_writer_tries(folder) -> str:
    """Another process takes the folder's lock if it can: 'took' or 'FolderInUse'."""
    code = textwrap.dedent(f"""
        from helpers.support.lock import FolderInUse, FolderLock
        try:
            FolderLock({str(folder)!r}, "a second writer", say=lambda _: None).acquire()
            print("took")
        except FolderInUse:
            print("FolderInUse")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "WORLD_SIZE": "1"}).stdout.strip()


def test_a_beating_block_keeps_the_lock_through_a_call_longer_than_the_stale_age(tmp_path, monkeypatch):
    """A push's upload is one blocking call that can outlast IPA_LOCK_STALE_MINUTES: silent, its lock is taken
    over by a second writer; inside `beating()` a thread keeps it fresh, and the thread ends with the block."""
    monkeypatch.setenv("IPA_LOCK_STALE_MINUTES", str(1.5 / 60))  # 1.5 s (the subprocess reads it too)
    silent, beating = tmp_path / "silent", tmp_path / "beating"
    with FolderLock(silent):
        time.sleep(2.5)  # one long call, no beat
        assert _second_writer_tries(silent) == "took"  # the fault: a live writer lost its folder
    with FolderLock(beating) as lock:
        with lock.beating(every=0.3):
            time.sleep(2.5)
            assert _second_writer_tries(beating) == "FolderInUse"
            assert read_lock(beating)["pid"] == os.getpid() and time.time() - read_lock(beating)["seen"] < 1.5
        thread = lock._beater
        assert not thread.is_alive() and thread not in threading.enumerate()
        seen = read_lock(beating)["seen"]
        time.sleep(0.6)
        assert read_lock(beating)["seen"] == seen  # nothing beats after the block
    assert not (beating / LOCK_FILE).exists()


def test_a_takeover_seen_by_the_beating_thread_is_raised_when_the_block_ends(tmp_path):
    with FolderLock(tmp_path) as lock:
        with pytest.raises(FolderInUse, match="taken over"):
            with lock.beating(every=0.1):
                info = read_lock(tmp_path)
                (tmp_path / LOCK_FILE).write_text(json.dumps({**info, "owner": "other/pid/2", "pid": 2, "host": "o"}))
                time.sleep(0.4)
        assert not lock._beater.is_alive() and read_lock(tmp_path)["owner"] == "other/pid/2"  # left to the other
