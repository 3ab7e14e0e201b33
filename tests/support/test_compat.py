"""helpers.support.compat: each library private name we lean on still exists and still behaves as the wrapper assumes.

When one of these fails after a library upgrade (Colab moves versions under us), the message names the
wrapper in helpers/compat.py to change; nothing else in helpers/ touches the private name.
"""
import inspect

import pytest
import torch

from helpers.support.compat import clip_score_update, dataset_fingerprint, dtype_kwargs


def test_diffusers_dtype_keyword_probe_still_exists_and_loads_in_that_dtype(tiny_profile):
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.utils import deprecation_utils
    from packaging.version import Version

    probe = hasattr(deprecation_utils, "_resolve_dtype")
    if Version(diffusers.__version__).release >= (0, 42):  # the rename is there (0.39, Colab's, has neither)
        assert probe, (
            "diffusers no longer has deprecation_utils._resolve_dtype, the probe helpers.support.compat.dtype_kwargs uses to "
            "choose from_pretrained's dtype= over torch_dtype=; check which keyword this diffusers takes and update it")
    assert dtype_kwargs(torch.float16) == {"dtype" if probe else "torch_dtype": torch.float16}
    unet = UNet2DConditionModel.from_pretrained(tiny_profile.base_model, subfolder="unet",
                                                **dtype_kwargs(torch.float16))
    assert unet.dtype == torch.float16, "from_pretrained ignored helpers.support.compat.dtype_kwargs' keyword"


def test_diffusers_unet_ip_adapter_loader_keeps_its_signature(tiny_profile):
    from diffusers import UNet2DConditionModel

    loader = getattr(UNet2DConditionModel, "_load_ip_adapter_weights", None)
    assert loader is not None, ("diffusers removed UNet2DConditionModel._load_ip_adapter_weights: "
                                "rewrite helpers.support.compat.load_ip_adapter_weights")
    params = list(inspect.signature(loader).parameters)
    assert params[:2] == ["self", "state_dicts"] and "low_cpu_mem_usage" in params, (
        f"UNet2DConditionModel._load_ip_adapter_weights now takes {params}: update helpers.support.compat.load_ip_adapter_weights")


def test_torchmetrics_per_sample_clip_score_keeps_its_signature():
    update = clip_score_update()
    params = list(inspect.signature(update).parameters)
    assert params == ["source", "target", "model", "processor"], (
        f"torchmetrics' _clip_score_update now takes {params}: update helpers.support.compat.clip_score_update and "
        "helpers.evaluate.metrics.CLIPScorer, which calls it")


def test_datasets_fingerprint_follows_the_content():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    try:
        before = dataset_fingerprint(ds)
    except AttributeError:
        pytest.fail("datasets.Dataset has no _fingerprint any more: rewrite helpers.support.compat.dataset_fingerprint")
    changed = ds.map(lambda row: {"text": row["text"] + "!"})
    assert isinstance(before, str) and before == dataset_fingerprint(ds)
    assert dataset_fingerprint(changed) != before, (
        "datasets' _fingerprint no longer changes with the data: helpers.data.sources.source_stamp would reuse stale "
        "prepared data; rewrite helpers.support.compat.dataset_fingerprint")
