"""Writing files so that an interruption never leaves half of one: write beside it, then rename over it.

    with replacing(path) as tmp:        # tmp: a path beside `path`; give it to any writer (save_file, ...)
        save_file(tensors, str(tmp))    # on success tmp replaces path in one rename; on failure it is deleted
    write_text(path, text)              # the same for a string
    write_json(path, obj)               # and for JSON

A rename within one folder is atomic on every file system the notebooks write to (a local disk, Colab's,
the mounted Google Drive): a reader sees the old file or the new one, never a part. `fsync=True` also
flushes the data to disk before the rename, for results that must survive a crash of the machine. A full disk
inside the block raises helpers.support.disk.DiskFull naming the file, and the old file stays as it was.

A process killed between its writes leaves `.NAME.tmp-PID` (or, between the two renames of a folder swap,
`.NAME.old-PID`) behind; the next writer that takes the folder's lock removes them (helpers.support.lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .disk import disk_errors


@contextlib.contextmanager
def replacing(path, *, fsync: bool = False):
    """Yield a temporary path beside `path` (a hidden name in the same folder). When the block ends without
    an error, whatever was written there (a file or a folder) replaces `path` in one rename (a folder over a
    folder: the old one is renamed aside first, then deleted, so a crash leaves a whole folder, never half of
    one); otherwise, and in any case afterwards, the temporary is deleted. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # left by an earlier, interrupted write of this process id
    try:
        with disk_errors(path):  # a full disk is named as such, with the file (helpers.support.disk)
            yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if tmp.is_dir() and path.is_dir():  # os.replace cannot put a folder over a non-empty one
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(path, text: str, *, fsync: bool = False) -> Path:
    """Write `text` to `path` atomically (see `replacing`). Returns the path."""
    with replacing(path, fsync=fsync) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    return Path(path)


def write_json(path, obj, *, indent: int = 1) -> Path:
    """Write `obj` as JSON (UTF-8, non-ASCII kept) to `path` atomically. Returns the path."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))
