"""A disk of a fixed capacity under one folder, for the training tests' full-disk faults (no mount, no root)."""
import errno
import shutil

import helpers.train.checkpoints as checkpoints_module
from helpers.train.checkpoints import folder_bytes


def fake_disk(monkeypatch, folder, free_now: int) -> int:
    """From now on, shutil.disk_usage reports for paths under `folder` what its files leave free of a capacity
    of (their bytes now + free_now), and the checkpoints' writer fails with ENOSPC past it. Returns the capacity."""
    capacity = folder_bytes(folder) + free_now
    real_usage, real_write = shutil.disk_usage, checkpoints_module._write

    def disk_usage(path):
        if str(path).startswith(str(folder)):
            used = folder_bytes(folder)
            return real_usage(path)._replace(total=capacity, used=used, free=max(0, capacity - used))
        return real_usage(path)

    def write(path, data):
        if folder_bytes(folder) + len(data) > capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(checkpoints_module, "_write", write)
    return capacity
