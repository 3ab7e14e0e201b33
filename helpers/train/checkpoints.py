"""Training checkpoints: the trainable weights, the optimizer and gradient-scaler state, the step, and the
settings a resumed run must share with the one that wrote them.

    DIR/checkpoints/ckpt-000100/trainable.safetensors   adapter_parameters() name -> fp32 tensor
    DIR/checkpoints/ckpt-000100/state.pt                {"optimizer": ..., "scaler": ..., "step": 100}
    DIR/checkpoints/ckpt-000100/checkpoint.json         {"step", "files": {name: bytes}, "sha256": {name: hex},
                                                         "settings": {...}}

Complete: checkpoint.json is written last and lists the size of every file, so a checkpoint is complete when
it is there and every file has its recorded size (`checkpoint_problem`, cheap: no file is read). A folder
that a cut Google Drive sync left with a file missing or short is not, and a resume falls back to the
previous one. Locally each checkpoint is written to a temporary folder and renamed (helpers.support.atomic).

Verified: checkpoint.json also holds the sha256 of the bytes of each file, computed from the very bytes
written. A resume verifies the checkpoint it is about to load, and only that one (`load_checkpoint`: each
file is read once, hashed and loaded from those bytes): re-reading every checkpoint from Drive at each save
would cost a gigabyte a time. A damaged one (right size, other bytes) falls back to the one before, with a
line naming the file. Checkpoints written before the sha256 was recorded still load, checked by size only.

Disk space: before a save, the space the checkpoint needs (`checkpoint_room`) is compared with the free
space; when it lacks and deleting the oldest complete checkpoints, down to keep - 1 but never below one,
makes room, they go first (`make_room`). The one left is the newest: the one this run resumed from
(verified as it loaded) or last wrote (hashed as it was written). Otherwise DiskFull names the folder, the
free and the needed MB and the fix. After the save, only the newest `keep` complete checkpoints are kept.

What a checkpoint holds is the least an exact resume needs: the trainable fp32 weights and AdamW's two fp32
moments per weight, 12 bytes per trainable parameter (`checkpoint_bytes`): about 0.6 GB for IP-Adapter Plus
at Stable Diffusion 1.5 size (52M trainable parameters, text-aware). Nothing frozen is saved.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import torch

from ..support.atomic import replacing
from ..support.disk import DRIVE_HINT, MB, DiskFull, disk_errors, free_bytes

CHECKPOINTS = "checkpoints"
WEIGHTS, STATE, MANIFEST = "trainable.safetensors", "state.pt", "checkpoint.json"
BYTES_PER_PARAMETER = 4 * 3  # fp32 weight + AdamW exp_avg + exp_avg_sq
ADAPTER_BYTES_PER_PARAMETER = 4  # the adapter file: the trainable weights in fp32


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights do not fit the model being trained; the message names it."""


class SettingsMismatch(ValueError):
    """A checkpoint written with other settings than the run that would resume it; the message names them."""


class CheckpointDamaged(ValueError):
    """A checkpoint file whose bytes differ from the sha256 recorded when it was written; the message names it."""


def checkpoint_problem(folder: Path) -> str | None:
    """None if the checkpoint in `folder` is complete, else what is wrong with it ("state.pt is missing",
    "trainable.safetensors has 1000 of 4000 bytes", ...). Sizes only: `load_checkpoint` verifies the bytes."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of {size} bytes"
    return None


def list_checkpoints(output_dir, *, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints under output_dir/checkpoints, oldest first: the complete ones, or
    with complete=False every ckpt-NNNNNN folder (check each with checkpoint_problem)."""
    folder = Path(output_dir) / CHECKPOINTS
    found = []
    for p in folder.glob("ckpt-*") if folder.is_dir() else []:
        if p.is_dir() and p.name[5:].isdigit() and (not complete or checkpoint_problem(p) is None):
            found.append((int(p.name[5:]), p))
    return sorted(found)


def checkpoint_settings(folder: Path) -> dict:
    """The settings saved with a complete checkpoint (what helpers.train compares before resuming)."""
    return json.loads((folder / MANIFEST).read_text()).get("settings", {})


def _write(path: Path, data) -> str:
    """Write `data` (bytes or a buffer) to `path`; returns the sha256 of exactly those bytes."""
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(output_dir, step: int, params: dict, optimizer, scaler_state, keep: int,
                    settings: dict | None = None, *, say=print) -> Path:
    """Write checkpoint `step` (atomically, checkpoint.json last, with each file's size and sha256), then delete
    all but the newest `keep` complete checkpoints. Before writing: incomplete checkpoints are deleted, and
    when the disk lacks room the oldest complete ones go too, down to keep - 1 but never below one
    (`make_room`; `say` names each). Raises DiskFull (naming the folder or the file) when there is no room;
    what was complete before is then left as it was. Returns the checkpoint's folder."""
    from safetensors.torch import save

    final = Path(output_dir) / CHECKPOINTS / f"ckpt-{step:06d}"
    for _, p in list_checkpoints(output_dir, complete=False):
        if checkpoint_problem(p) is not None:
            shutil.rmtree(p, ignore_errors=True)
    make_room(output_dir, checkpoint_room(sum(p.numel() for p in params.values())), keep,
              what=f"checkpoint {final.name}", say=say)
    with replacing(final) as tmp:
        tmp.mkdir()
        sizes, hashes = {}, {}
        data = save({k: v.detach().cpu().contiguous() for k, v in params.items()})
        with disk_errors(final / WEIGHTS, what=f"{final.name}/{WEIGHTS}"):
            sizes[WEIGHTS], hashes[WEIGHTS] = len(data), _write(tmp / WEIGHTS, data)
        del data
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler_state, "step": step}, buffer)
        with disk_errors(final / STATE, what=f"{final.name}/{STATE}"):
            sizes[STATE], hashes[STATE] = buffer.tell(), _write(tmp / STATE, buffer.getbuffer())
        del buffer
        manifest = {"step": step, "files": sizes, "sha256": hashes, "settings": settings or {}}
        with disk_errors(final / MANIFEST, what=f"{final.name}/{MANIFEST}"):
            _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    for _, old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_verified(path: Path) -> dict[str, bytes]:
    """The bytes of a checkpoint's weights and state, each checked against the sha256 in checkpoint.json (a
    checkpoint written before it was recorded: not checked). Raises CheckpointDamaged naming a file that differs."""
    hashes = json.loads((path / MANIFEST).read_text()).get("sha256") or {}
    data = {}
    for name in (WEIGHTS, STATE):
        data[name] = (path / name).read_bytes()
        if name in hashes and hashlib.sha256(data[name]).hexdigest() != hashes[name]:
            raise CheckpointDamaged(f"{name} differs from the sha256 that {MANIFEST} recorded when it was written")
    return data


def load_checkpoint(path: Path, params: dict, optimizer) -> dict:
    """Verify a checkpoint, then copy its weights into `params` (in place) and its state into `optimizer`;
    returns the saved state ({"optimizer", "scaler", "step"}). Each file is read once, checked against its
    sha256 in checkpoint.json (older checkpoints without one: by size only, in checkpoint_problem) and loaded
    from those bytes; both are checked before anything is changed, so a damaged checkpoint leaves params and
    optimizer as they were. Raises CheckpointDamaged for a file whose bytes changed, CheckpointMismatch if its
    weights are another model's; whatever safetensors / torch.load raise for an unreadable file."""
    from safetensors.torch import load

    data = _read_verified(path)
    saved = load(data.pop(WEIGHTS))
    state = torch.load(io.BytesIO(data.pop(STATE)), map_location="cpu", weights_only=True)
    wrong = sorted(k for k in saved.keys() & params.keys() if saved[k].shape != params[k].shape)
    if saved.keys() != params.keys() or wrong:
        unknown = sorted(saved.keys() - params.keys())
        raise CheckpointMismatch(
            f"{path}: its weights do not match this model ({len(saved)} tensors vs {len(params)}; "
            f"{len(unknown)} unknown names, e.g. {unknown[:1]}; {len(wrong)} of another shape, e.g. {wrong[:1]}). "
            "It was written by another variant or model: use another output folder, or start over "
            "(FRESH_START in notebook 03, --fresh-start).")
    optimizer.load_state_dict(state["optimizer"])
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    return state


def resume_from(output_dir, settings: dict, must_match: dict[str, str], params: dict, optimizer, *,
                say=print, discard: bool = False, read_saved=None) -> tuple[int, Path | None, dict]:
    """Load the newest complete checkpoint into params and optimizer, verified (load_checkpoint): returns
    (step, folder, saved state), or (0, None, {}) when there is none. An incomplete, damaged or unreadable
    newest checkpoint is skipped for the one before, and `say` is told why and which file. discard=True (the
    main process, holding the run folder's lock, so that no other writer can still be filling them) then
    deletes the checkpoints it skipped: they are newer than the one loaded, and this run writes them again.
    Raises SettingsMismatch when the checkpoint was written with other values of the `must_match` settings
    ({name in settings: words for the message}) than `settings`; nothing is deleted then. read_saved(saved)
    puts a checkpoint's saved settings in today's terms first (helpers.train.config.comparable_settings)."""
    found = list_checkpoints(output_dir, complete=False)
    skipped, result = [], (0, None, {})
    for i, (step, path) in reversed(list(enumerate(found))):
        problem, kind = checkpoint_problem(path), "incomplete"
        if problem is None:
            saved = checkpoint_settings(path)
            saved = read_saved(saved) if read_saved else saved
            differs = [(words, saved.get(key), settings.get(key)) for key, words in must_match.items()
                       if key in saved and saved.get(key) != settings.get(key)]
            if differs:
                raise SettingsMismatch(
                    f"{path} was written with other settings than this run's: "
                    + "; ".join(f"{words} {old!r} there, {new!r} now" for words, old, new in differs)
                    + ". Resuming would mix two recipes in one adapter. Set them back to continue that run, or "
                      "start over: FRESH_START = True in notebook 03 (--fresh-start on the command line) deletes "
                      f"its checkpoints and loss log; or choose another output folder than {Path(output_dir)}.")
            try:
                result = step, path, load_checkpoint(path, params, optimizer)
                break
            except CheckpointMismatch:
                raise
            except CheckpointDamaged as e:
                problem, kind = str(e), "damaged"
            except Exception as e:  # noqa: BLE001  (a damaged file of the right size: skip it like a missing one)
                problem, kind = f"unreadable: {type(e).__name__}: {str(e)[:200]}", "damaged"
        skipped.append(path)
        then = f"falling back to {found[i - 1][1].name}" if i else "no earlier checkpoint: starting from step 0"
        why = ("as a Google Drive sync cut off by a disconnect leaves it" if kind == "incomplete"
               else "its bytes changed after it was written, or it never was written whole")
        say(f"Checkpoint {path} is {kind} ({problem}), {why}; {then}.")
    if discard:
        for path in skipped:
            shutil.rmtree(path, ignore_errors=True)
    return result


def delete_checkpoints(output_dir) -> list[tuple[Path, int]]:
    """Delete every checkpoint folder under output_dir/checkpoints (complete or not); returns (folder, bytes)
    of each, so the caller can say what went (on Google Drive, to the trash)."""
    gone = []
    for _, p in list_checkpoints(output_dir, complete=False):
        gone.append((p, folder_bytes(p)))
        shutil.rmtree(p, ignore_errors=True)
    for tmp in (Path(output_dir) / CHECKPOINTS).glob(".ckpt-*.tmp-*"):  # left by an interrupted save
        shutil.rmtree(tmp, ignore_errors=True)
    return gone


def folder_bytes(folder: Path) -> int:
    """The bytes of the files in a folder and below."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def checkpoint_bytes(trainable_parameters: int) -> int:
    """The size of one checkpoint for this many trainable parameters (fp32 weights and AdamW's two moments;
    the few bytes of step counters, scaler and file headers left out)."""
    return BYTES_PER_PARAMETER * trainable_parameters


def checkpoint_room(trainable_parameters: int) -> int:
    """The free space a save asks for: checkpoint_bytes with 2% and 64 KiB to spare for the files' headers."""
    return int(checkpoint_bytes(trainable_parameters) * 1.02) + 2**16


def adapter_bytes(trainable_parameters: int) -> int:
    """The size of the final adapter file (the trainable weights in fp32; its header left out)."""
    return ADAPTER_BYTES_PER_PARAMETER * trainable_parameters


def make_room(output_dir, needed: int, keep: int, *, what: str, prune: bool = True, say=print) -> None:
    """Make sure `needed` bytes fit on output_dir's disk before writing `what`. If the free space lacks them but
    deleting the oldest complete checkpoints, down to keep - 1 and never below one, would free enough, those
    are deleted (oldest first, only as many as needed; `say` names each), unless prune=False (then this only
    checks: the saves prune when they must). Otherwise raises DiskFull naming the folder, the free and the
    needed MB and the fix, and deletes nothing."""
    output_dir = Path(output_dir)
    free = free_bytes(output_dir)
    if free >= needed:
        return
    spare = list_checkpoints(output_dir)[:-max(1, keep - 1)]
    sizes = [folder_bytes(p) for _, p in spare]
    if free + sum(sizes) >= needed:
        if not prune:
            return
        for (_, p), size in zip(spare, sizes):
            shutil.rmtree(p, ignore_errors=True)
            say(f"Deleted {p.name} ({size / MB:,.1f} MB), the oldest checkpoint, to make room for {what} in "
                f"{output_dir} (keep {keep}).")
            free = free_bytes(output_dir)
            if free >= needed:
                return
        spare = []  # deleting did not free what it held (a trash that counts against the quota)
    freed = (f"; deleting the older checkpoints would free only {sum(sizes) / MB:,.1f} MB more" if spare else
             "; the checkpoints deleted here did not give their space back" if sizes else "")
    fewer = ", or keep fewer checkpoints: --keep-checkpoints 1" if keep > 1 else ""
    raise DiskFull(
        f"Not enough disk space in {output_dir} for {what}: {free / MB:,.1f} MB free, {needed / MB:,.1f} MB "
        f"needed{freed}. Free some space (delete other runs' folders{fewer}), or choose another output folder; "
        f"then run the same cell or command again: it resumes from the newest checkpoint. {DRIVE_HINT}")


def checkpoints_written(max_steps: int, every: int) -> int:
    """How many checkpoints a run of max_steps writes: every `every` steps, and one at the end."""
    return max_steps // every + (1 if max_steps % every else 0)


def drive_space(trainable_parameters: int, max_steps: int, every: int, keep: int) -> dict[str, int]:
    """Disk space of one run's checkpoints, in bytes: `checkpoint` (one), `kept` (the newest `keep` at the end)
    and `trashed` (the older ones deleted on the way: on Google Drive they sit in the trash, and count against
    the quota, until it is emptied), with `written`, the number of checkpoints."""
    one = checkpoint_bytes(trainable_parameters)
    n = checkpoints_written(max_steps, every)
    return {"checkpoint": one, "written": n, "kept": one * min(n, keep), "trashed": one * max(0, n - keep)}
