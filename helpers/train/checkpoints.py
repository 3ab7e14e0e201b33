"""Training checkpoints: the trainable weights, the optimizer and gradient-scaler state, the step, and the
settings a resumed run must share with the one that wrote them.

    DIR/checkpoints/ckpt-000100/trainable.safetensors   adapter_parameters() name -> fp32 tensor
    DIR/checkpoints/ckpt-000100/state.pt                {"optimizer": ..., "scaler": ..., "step": 100}
    DIR/checkpoints/ckpt-000100/checkpoint.json         {"step", "files": {name: bytes}, "settings": {...}}

checkpoint.json is written last and lists the size of every file, so a checkpoint is complete when it is
there and every file has its recorded size (`checkpoint_problem`). A folder that a cut Google Drive sync left
with a file missing or short is not, and a resume falls back to the previous one. Locally each checkpoint
is written to a temporary folder and renamed (helpers.support.atomic); only the newest `keep` complete ones are kept.

What a checkpoint holds is the least an exact resume needs: the trainable fp32 weights and AdamW's two fp32
moments per weight, 12 bytes per trainable parameter (`checkpoint_bytes`): about 0.6 GB for IP-Adapter Plus
at Stable Diffusion 1.5 size (52M trainable parameters, text-aware). Nothing frozen is saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..support.atomic import replacing

CHECKPOINTS = "checkpoints"
WEIGHTS, STATE, MANIFEST = "trainable.safetensors", "state.pt", "checkpoint.json"
BYTES_PER_PARAMETER = 4 * 3  # fp32 weight + AdamW exp_avg + exp_avg_sq


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights do not fit the model being trained; the message names it."""


class SettingsMismatch(ValueError):
    """A checkpoint written with other settings than the run that would resume it; the message names them."""


def checkpoint_problem(folder: Path) -> str | None:
    """None if the checkpoint in `folder` is complete, else what is wrong with it ("state.pt is missing",
    "trainable.safetensors has 1000 of 4000 bytes", ...)."""
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


def save_checkpoint(output_dir, step: int, params: dict, optimizer, scaler_state, keep: int,
                    settings: dict | None = None) -> Path:
    """Write checkpoint `step` (atomically, checkpoint.json last), then delete all but the newest `keep`
    complete checkpoints and every incomplete one. Returns its folder."""
    from safetensors.torch import save_file

    final = Path(output_dir) / CHECKPOINTS / f"ckpt-{step:06d}"
    with replacing(final) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler_state, "step": step}, tmp / STATE)
        files = {name: (tmp / name).stat().st_size for name in (WEIGHTS, STATE)}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, "settings": settings or {}}, indent=1))
    complete = list_checkpoints(output_dir)
    for _, old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for _, p in list_checkpoints(output_dir, complete=False):
        if checkpoint_problem(p) is not None:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, params: dict, optimizer) -> dict:
    """Copy a checkpoint's weights into `params` (in place) and its state into `optimizer`; returns the saved
    state ({"optimizer", "scaler", "step"}). Both files are read and checked before anything is changed, so a
    damaged checkpoint leaves params and optimizer as they were. Raises CheckpointMismatch if its weights are
    another model's; whatever safetensors / torch.load raise for an unreadable file."""
    from safetensors.torch import load_file

    saved = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
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
                say=print) -> tuple[int, Path | None, dict]:
    """Load the newest complete checkpoint into params and optimizer: returns (step, folder, saved state), or
    (0, None, {}) when there is none. An incomplete or unreadable newest checkpoint is skipped for the one
    before, and `say` is told why. Raises SettingsMismatch when the checkpoint was written with other values
    of the `must_match` settings ({name in settings: words for the message}) than `settings`."""
    found = list_checkpoints(output_dir, complete=False)
    for i, (step, path) in reversed(list(enumerate(found))):
        problem = checkpoint_problem(path)
        if problem is None:
            saved = checkpoint_settings(path)
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
                return step, path, load_checkpoint(path, params, optimizer)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001  (a damaged file of the right size: skip it like a missing one)
                problem = f"unreadable: {type(e).__name__}: {str(e)[:200]}"
        then = f"falling back to {found[i - 1][1].name}" if i else "no earlier checkpoint: starting from step 0"
        say(f"Checkpoint {path} is incomplete ({problem}), as a Google Drive sync cut off by a disconnect "
            f"leaves it; {then}.")
    return 0, None, {}


def delete_checkpoints(output_dir) -> list[tuple[Path, int]]:
    """Delete every checkpoint folder under output_dir/checkpoints (complete or not); returns (folder, bytes)
    of each, so the caller can say what went (on Google Drive, to the trash)."""
    gone = []
    for _, p in list_checkpoints(output_dir, complete=False):
        gone.append((p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())))
        shutil.rmtree(p, ignore_errors=True)
    for tmp in (Path(output_dir) / CHECKPOINTS).glob(".ckpt-*.tmp-*"):  # left by an interrupted save
        shutil.rmtree(tmp, ignore_errors=True)
    return gone


def checkpoint_bytes(trainable_parameters: int) -> int:
    """The size of one checkpoint for this many trainable parameters (fp32 weights and AdamW's two moments;
    the few bytes of step counters, scaler and file headers left out)."""
    return BYTES_PER_PARAMETER * trainable_parameters


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
