"""One writer per folder: a lock file with a heartbeat, shared by the processes of one launch.

    with FolderLock(run_dir, "training") as lock:   # stops at once if another writer holds the folder
        for step in ...:
            lock.beat()                              # refreshes the heartbeat (at most every BEAT_SECONDS)
        with lock.beating(every=60):                 # one long blocking call (an upload): a thread beats
            api.upload_folder(...)

The lock is `.lock.json` in the folder: {"owner", "pid", "host", "purpose", "since", "seen"}. Another writer
stops at once with FolderInUse: "in use by pid N on HOST since T, last seen S ago". A lock whose heartbeat is
older than `stale_after` (default STALE_MINUTES, env IPA_LOCK_STALE_MINUTES) is stale, whatever its host and
pid, and is taken over with a line that says so: after a Colab disconnect the new machine has another host name
and the old pid means nothing there, so only the heartbeat can tell. On the lock's own host a writer whose
process is gone (a kill -9, a restarted kernel) is stale at once: the same command can be run again straight away. IPA_BREAK_LOCK=1 (or force=True) takes a
lock that is not stale, for the day a user knows better.

The processes of one `torchrun`/`accelerate launch` share one lock: its owner is the launch (TORCHELASTIC_RUN_ID,
else MASTER_ADDR:MASTER_PORT), not the process, so every rank may enter and the main one beats and releases.

Once the lock is held, every temporary left in the folder (`.NAME.tmp-PID`, `.NAME.old-PID` of
helpers.support.atomic, `.prepare-*`) is stale: no live writer owns it. `FolderLock` removes them on entry
(`clean_temporaries`), so a process killed mid-save leaves nothing behind for good. Pass keep= for names
that must survive (shares of other ranks not merged yet).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

LOCK_FILE = ".lock.json"
STALE_MINUTES = 10.0  # a live writer beats far more often than this (every step, job or image)
BEAT_SECONDS = 30.0  # beat() writes at most this often: on Google Drive every write is an upload
STALE_ENV, BREAK_ENV = "IPA_LOCK_STALE_MINUTES", "IPA_BREAK_LOCK"
TEMPORARY_MARKERS = (".tmp-", ".old-", ".prepare-")  # in hidden names only (they start with a dot)


class FolderInUse(RuntimeError):
    """Another live writer holds the folder; the message names it and says what to do."""


def launch_id() -> str:
    """Who owns a lock: this process, or the launch it is a rank of (ranks share the lock)."""
    host = socket.gethostname()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run = os.environ.get("TORCHELASTIC_RUN_ID") or \
            f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        return f"{host}/launch/{run}"
    return f"{host}/pid/{os.getpid()}"


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _stale_seconds(stale_after: float | None) -> float:
    if stale_after is not None:
        return float(stale_after)
    return 60.0 * float(os.environ.get(STALE_ENV, STALE_MINUTES))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _process_gone(info: dict) -> bool:
    """Whether the lock's writer ran on this machine and its process no longer exists (a kill -9, a restarted
    kernel). Only a same-host check can tell; another host's pid means nothing here, so there only the
    heartbeat decides."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


def read_lock(folder) -> dict | None:
    """The lock of a folder as a dict, or None when there is none (or it cannot be read: a cut write)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe_lock(info: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", now)))
    return (f"in use by pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('purpose', 'a writer')}) "
            f"since {since}, last seen {_ago(now - info.get('seen', 0))} ago")


def clean_temporaries(folder, *, keep=()) -> list[Path]:
    """Delete every temporary (a hidden name holding .tmp-, .old- or .prepare-) in `folder` and below, but
    those named in `keep`. Call it only while holding the folder's lock: then none has a live writer.
    Returns what went."""
    folder = Path(folder)
    keep = {str(k) for k in keep}
    gone = []
    if not folder.is_dir():
        return gone
    for root, dirs, files in os.walk(folder):
        for name in list(dirs) + files:
            if name.startswith(".") and any(m in name for m in TEMPORARY_MARKERS) and name not in keep:
                p = Path(root) / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    dirs.remove(name)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p)
    return gone


class FolderLock:
    """The lock of one folder (see the module docstring). Re-entrant within one launch: a nested FolderLock of
    the same owner on the same folder enters at once and leaves the lock in place."""

    def __init__(self, folder, purpose: str = "a writer", *, stale_after: float | None = None,
                 force: bool | None = None, say=print, clean: bool = True, keep=()):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self.stale_after = _stale_seconds(stale_after)
        self.force = force if force is not None else os.environ.get(BREAK_ENV, "") not in ("", "0")
        self.say = say
        self.clean, self.keep = clean, keep
        self.owner = launch_id()
        self.held = False
        self.nested = False
        self._last_beat = 0.0
        self._beat_lock = threading.Lock()  # beat() from a beating() thread and from the caller, one at a time
        self._beater: threading.Thread | None = None

    # --- taking and giving back ---------------------------------------------------------------------
    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another writer's takeover: look again
            info = read_lock(self.folder)
            if info is None and self.path.exists():  # a lock being written right now, or a cut one
                time.sleep(0.2)
                info = read_lock(self.folder)
                if info is None:
                    self.say(f"{self.path}: an unreadable lock file (a cut write); taking the folder over.")
                    self.path.unlink(missing_ok=True)
            if info is not None:
                if info.get("owner") == self.owner:
                    self.held, self.nested = True, not _is_main_rank() or self._held_here()
                    return self
                age = time.time() - float(info.get("seen", 0))
                gone = _process_gone(info)
                if age <= self.stale_after and not self.force and not gone:
                    raise FolderInUse(
                        f"{self.folder} is {describe_lock(info)}. Two writers on one folder would mix or lose "
                        f"their files. Wait for it to finish, or use another folder. If no other notebook or "
                        f"command writes there (a Colab session that died leaves its lock, which goes stale "
                        f"{_ago(self.stale_after)} after its last beat), set {BREAK_ENV}=1 to take it over now.")
                why = (f"stale: no heartbeat for {_ago(age)}" if age > self.stale_after else
                       "its process is gone from this machine" if gone else "forced")
                self.say(f"{self.folder}: taking over the lock of pid {info.get('pid', '?')} on "
                         f"{info.get('host', '?')} ({why}).")
                self._remove_if(info)
            if self._create():
                break
        else:
            info = read_lock(self.folder) or {}
            raise FolderInUse(f"{self.folder} is {describe_lock(info)}: another writer took it just now.")
        self.held = True
        if self.clean:
            clean_temporaries(self.folder, keep=self.keep)
        return self

    def _held_here(self) -> bool:
        """Whether a FolderLock of this process already holds the folder (then this entry is nested)."""
        return _HELD.get(str(self.path.resolve()), 0) > 0

    def _record(self, since: float | None = None) -> dict:
        now = time.time()
        return {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "since": since if since is not None else now, "seen": now}

    def _create(self) -> bool:
        """Create the lock file only if none exists (O_EXCL); False if another writer was first."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        self._last_beat = time.time()
        return True

    def _remove_if(self, info: dict) -> None:
        """Remove the lock file if it still holds `info` (not a newer writer's)."""
        if read_lock(self.folder) == info:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the folder back (the main rank of the owner removes the file; a nested entry leaves it)."""
        if not self.held:
            return
        self.held = False
        if self.nested or not _is_main_rank():
            return
        info = read_lock(self.folder)
        if info is not None and info.get("owner") == self.owner:
            self.path.unlink(missing_ok=True)

    # --- staying alive ------------------------------------------------------------------------------
    def beat(self, *, force: bool = False) -> None:
        """Refresh the heartbeat (written at most every BEAT_SECONDS unless force). Raises FolderInUse when
        another writer has taken the folder over meanwhile (this one was seen as stale). Thread-safe."""
        if not self.held or not _is_main_rank():
            return
        with self._beat_lock:  # one write at a time: both threads would write the same .lock.json.tmp-PID
            now = time.time()
            if not force and now - self._last_beat < BEAT_SECONDS:
                return
            info = read_lock(self.folder)
            if info is not None and info.get("owner") != self.owner:
                self.held = False
                raise FolderInUse(f"{self.folder} was taken over by another writer ({describe_lock(info)}) while "
                                  f"this one was silent for {_ago(now - self._last_beat)}; stopping so as not to "
                                  "mix their files.")
            from .atomic import write_json

            write_json(self.path, self._record(since=(info or {}).get("since")))
            self._last_beat = now

    @contextlib.contextmanager
    def beating(self, every: float = 60.0):
        """Beat from a daemon thread every `every` seconds (at most a third of the stale age) until the block
        ends, for one long blocking call that cannot beat itself (huggingface_hub's upload can outlast the
        stale age). The thread is stopped and joined when the block ends. A takeover seen by the thread
        (FolderInUse) stops the beating and is raised when the block ends; a failed write (a Drive hiccup) is
        said once and tried again at the next beat."""
        every = max(0.05, min(float(every), self.stale_after / 3))
        stop, taken, said = threading.Event(), [], []

        def run():
            while not stop.wait(every):
                try:
                    self.beat(force=True)
                except FolderInUse as e:
                    taken.append(e)
                    return
                except Exception as e:  # noqa: BLE001  (a thread's error would be lost: say it, beat again)
                    if not said:
                        said.append(e)
                        self.say(f"{self.path}: could not refresh the heartbeat ({type(e).__name__}: {e}); "
                                 f"trying again every {every:g} s.")

        self._beater = threading.Thread(target=run, name=f"FolderLock beat {self.folder}", daemon=True)
        self._beater.start()
        try:
            yield self
        finally:
            stop.set()
            self._beater.join()
        if taken:
            raise taken[0]

    def __enter__(self) -> "FolderLock":
        self.acquire()
        key = str(self.path.resolve())
        _HELD[key] = _HELD.get(key, 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        _HELD[key] = max(0, _HELD.get(key, 0) - 1)
        self.release()


_HELD: dict[str, int] = {}  # lock path -> how many FolderLocks of this process hold it (nested entries)
