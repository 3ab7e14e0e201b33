"""Every use of a library's private name, each in one thin wrapper with the reason it is needed.

Colab's library versions move under us, so nothing else in helpers/ touches a private name: when a library
changes one of these, tests/support/test_compat.py fails with a message that names the wrapper to fix.

    dtype_kwargs(dtype)            diffusers: `dtype=` or the older `torch_dtype=` for from_pretrained
    load_ip_adapter_weights(unet, state_dict)
                                   diffusers: attach an IP-Adapter to a lone UNet (no pipeline)
    clip_score_update()            torchmetrics: the per-sample CLIP score (100 x cosine, unclamped)
    dataset_fingerprint(ds)        datasets: the content fingerprint of an in-memory Dataset
"""

from __future__ import annotations

import torch


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`{"dtype": dtype}` where diffusers takes it, else `{"torch_dtype": dtype}`.

    Why private: diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warns on the old name)
    without a version flag; the helper `deprecation_utils._resolve_dtype` arrived with the rename, so its
    presence is the probe. Colab's diffusers (0.39) still takes `torch_dtype`. For transformers models
    pass `dtype=` directly: every transformers 5 takes it, and `torch_dtype` is deprecated there.
    """
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_ip_adapter_weights(unet, state_dict: dict) -> None:
    """Attach an IP-Adapter ({"image_proj": ..., "ip_adapter": ...}, diffusers' loader format) to a UNet.

    Why private: diffusers' public `pipe.load_ip_adapter` needs a whole pipeline (image encoder, VAE, text
    encoder); training from cached features needs the UNet alone. `UNet2DConditionModel._load_ip_adapter_weights`
    is the call `pipe.load_ip_adapter` makes, so the modules and weights are the same (tests/support/test_compat.py).
    """
    unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)


def clip_score_update():
    """torchmetrics' per-sample CLIP score function: (100 x cosine per pair, unclamped, number of pairs).

    Why private: torchmetrics' public `clip_score` / `CLIPScore` only give the batch mean, clamped at 0;
    `_clip_score_update` is the same code (processor, features, normalisation) before any averaging.
    Image-image scoring arrived with its `_detect_modality` (torchmetrics 1.9).
    """
    try:
        from torchmetrics.functional.multimodal.clip_score import (
            _clip_score_update as update,
        )
        from torchmetrics.functional.multimodal.clip_score import _detect_modality  # noqa: F401  (present: 1.9+)
    except ImportError as e:
        import torchmetrics

        raise ImportError(
            f"helpers.evaluate.metrics needs torchmetrics' CLIP score with image-image support (torchmetrics 1.9 "
            f"works; found {torchmetrics.__version__}): pip install -U torchmetrics"
        ) from e
    return update


def dataset_fingerprint(ds) -> str:
    """The fingerprint datasets keeps for a Dataset (a hash of its data and every transform applied to it).

    Why private: datasets exposes no public accessor for `Dataset._fingerprint`, and hashing the rows
    ourselves would read every image of an in-memory dataset.
    """
    return str(ds._fingerprint)
