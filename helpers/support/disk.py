"""Disk space, said plainly: a check before a big write, and a full disk named as such when a write fails.

    check_space(run_dir, needed_bytes, what="the next checkpoint")   # DiskFull before anything is written
    with disk_errors(path):                                          # a writer's ENOSPC -> DiskFull naming path
        save_file(tensors, path)

Libraries report a full disk in their own words: Python's OSError (errno ENOSPC, or EDQUOT on a quota such as
Google Drive's), safetensors' and pyarrow's messages, and torch.save's "[enforce fail at inline_container.cc]
unexpected pos" or "file write failed", which never say "disk". `disk_errors` turns each into one DiskFull that
names the file, the folder's free space and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

MB = 2**20
DRIVE_HINT = ("On Google Drive, files you delete go to the trash and still count against your quota until "
              "you empty it (drive.google.com, Trash, Empty trash).")
_FULL_WORDS = ("no space left", "disk quota exceeded", "not enough space", "enospc", "edquot")
_TORCH_WRITE_WORDS = ("unexpected pos", "file write failed")  # torch.save's zip writer on a full disk


class DiskFull(OSError):
    """There is not room for a write; the message names the file or folder, the free and needed MB, the fix."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def free_bytes(path) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_space(folder, needed: int, *, what: str = "this write", margin: int = 0) -> None:
    """Raise DiskFull unless `folder`'s file system has `needed` + `margin` bytes free."""
    free = free_bytes(folder)
    if free < needed + margin:
        raise DiskFull(f"Not enough disk space in {Path(folder)} for {what}: {free / MB:,.0f} MB free, "
                       f"{(needed + margin) / MB:,.0f} MB needed. Free some space (delete old runs or "
                       f"checkpoints, or keep fewer), or choose another output folder. {DRIVE_HINT}")


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception from a writer means the disk (or the quota) is full."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(w in text for w in _FULL_WORDS + _TORCH_WRITE_WORDS)


@contextlib.contextmanager
def disk_errors(path, *, what: str | None = None):
    """Turn a full-disk error raised inside the block into DiskFull naming `path` (any other error passes)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:  # noqa: BLE001  (only full-disk errors are translated; the rest re-raised as they are)
        if not is_disk_full(e):
            raise
        path = Path(path)
        raise DiskFull(f"The disk is full: could not write {what or path} ({path}); {free_bytes(path) / MB:,.0f} MB "
                       f"free there now ({type(e).__name__}: {str(e)[:120]}). Free some space, or choose another "
                       f"output folder, then run the same cell or command again: what was complete before is "
                       f"kept. {DRIVE_HINT}") from e
