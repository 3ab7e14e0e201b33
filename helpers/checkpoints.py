"""Training checkpoints: the trainable weights (safetensors), the optimizer and gradient-scaler state, the step.

    DIR/checkpoints/ckpt-000100/trainable.safetensors   adapter_parameters() name -> fp32 tensor
    DIR/checkpoints/ckpt-000100/state.pt                {"optimizer": ..., "scaler": ..., "step": 100}

Each is written to a temporary folder and renamed, so a folder named ckpt-NNNNNN is always complete; only
the newest `keep` are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights do not fit the model being trained; the message names it."""


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under output_dir/checkpoints, oldest first."""
    folder = output_dir / CHECKPOINTS
    found = []
    for p in folder.glob("ckpt-*") if folder.is_dir() else []:
        if p.is_dir() and p.name[5:].isdigit() and (p / "trainable.safetensors").is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def save_checkpoint(output_dir: Path, step: int, params: dict, optimizer, scaler_state, keep: int) -> Path:
    """Write checkpoint `step` (atomically) and delete all but the newest `keep`. Returns its folder."""
    from safetensors.torch import save_file

    folder = output_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{step:06d}"
    tmp = folder / f".tmp-ckpt-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler_state, "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, params: dict, optimizer) -> dict:
    """Copy a checkpoint's weights into `params` (in place) and its state into `optimizer`; returns the saved
    state ({"optimizer", "scaler", "step"}). Raises CheckpointMismatch if its weights are another model's."""
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    if saved.keys() != params.keys():
        unknown = sorted(saved.keys() - params.keys())
        raise CheckpointMismatch(
            f"{path}: its weights do not match this model ({len(saved)} tensors vs {len(params)}; "
            f"{len(unknown)} unknown names, e.g. {unknown[:1]}). It was written by another variant or by an older "
            "helpers.train: use another --output-dir, or delete that checkpoints folder to start afresh.")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state
