"""The one device and precision decision of the series (as fastai's `def_device`): where models run and in
which dtype.

    device, dtype = default_device_dtype()     # cuda + fp16 with a GPU, else cpu + fp32
    mixed = choose_mixed_precision()           # training: "fp16" on a T4, "bf16" on Ampere and newer, "no" on a CPU

A T4 (compute capability 7.5) has no native bf16, although `torch.cuda.is_bf16_supported()` says True (by
emulation, slowly): below capability 8 the choice is fp16. With fp16 the trainable weights stay fp32 and a
gradient scaler guards the backward pass (helpers.train).
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype): the given ones, else cuda + fp16 when a GPU is present (a T4 has no native bf16),
    else cpu + fp32."""
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def choose_mixed_precision(requested: str = "auto") -> str:
    """Accelerate's mixed_precision for training: the requested one, or for "auto" fp16 below compute
    capability 8 (a T4 reports bf16 support, but only by emulation), bf16 from Ampere on, "no" on a CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
