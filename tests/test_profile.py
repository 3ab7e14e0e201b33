"""helpers.profile: auto picks full with a GPU and tiny without, says so, and the override works."""
import pytest
import torch

from helpers.profile import (
    DEFAULT_SCHEDULER,
    PROFILE_ENV,
    QUICK_ENV,
    QUICK_INFERENCE_STEPS,
    QUICK_REFERENCES,
    QUICK_SCALE,
    QUICK_TRAIN_STEPS,
    RESOLUTION_ENV,
    get_profile,
)


def test_auto_without_gpu_is_tiny_with_banner(monkeypatch, capsys):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prof = get_profile()
    line = capsys.readouterr().out.strip()
    assert prof.name == "tiny" and prof.random_weights
    assert line.startswith("Profile: tiny") and "RANDOM" in line and "no CUDA GPU" in line and "\n" not in line


def test_auto_with_gpu_is_full(monkeypatch, capsys):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    prof = get_profile()
    assert prof.name == "full" and not prof.random_weights and "Tesla T4" in capsys.readouterr().out
    assert prof.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and prof.resolution == 512
    assert (prof.train_batch_size, prof.num_epochs, prof.learning_rate) == (4, 6, 1e-4)


def test_environment_variable_and_argument_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(PROFILE_ENV, "tiny")
    assert get_profile(announce=False).name == "tiny"
    assert get_profile("auto", announce=False).name == "tiny"  # a config cell left on "auto" defers to it
    assert get_profile("full", announce=False).name == "full"  # an explicit choice in the cell wins


def test_only_none_keeps_the_profile_value():
    """A form field left at None keeps the profile's value; 0, False and "" are values and stick."""
    prof = get_profile("full", announce=False, train_batch_size=None, num_inference_steps=20, guidance_scale=0,
                         test_fraction=0.0)
    assert prof.train_batch_size == 4 and prof.num_inference_steps == 20
    assert prof.guidance_scale == 0 and prof.test_fraction == 0.0
    assert prof.dataset == "Norod78/RickAndMorty-HorizontalMirror-blip-captions"
    on = prof.replace(gradient_checkpointing=True)
    assert on.gradient_checkpointing is True and on.replace(gradient_checkpointing=False).gradient_checkpointing is False
    assert on.replace(gradient_checkpointing=None).gradient_checkpointing is True
    with pytest.raises(TypeError, match="Profile has no field guidance; the fields are"):
        prof.replace(guidance=0)


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, "huge")
    with pytest.raises(ValueError, match="unknown profile 'huge'.*auto, full, tiny"):
        get_profile()


def test_tiny_profile_points_at_local_assets(tiny_profile):
    from pathlib import Path

    for path in (tiny_profile.base_model, tiny_profile.ip_adapter, tiny_profile.eval_clip, tiny_profile.dataset,
                 tiny_profile.segmenter):
        assert Path(path).exists()


def test_the_segmenter_and_mask_settings():
    """Issue 27: CLIPSeg beside the other models, a threshold on its probability, the background's loss weight."""
    full, tiny = get_profile("full", announce=False), get_profile("tiny", announce=False)
    assert full.segmenter == "CIDAS/clipseg-rd64-refined" and tiny.segmenter.endswith("clipseg")
    assert (full.mask_threshold, full.mask_background_weight) == (0.5, 0.1) == (tiny.mask_threshold,
                                                                                 tiny.mask_background_weight)
    assert get_profile("full", announce=False, mask_threshold=0.3).mask_threshold == 0.3


def test_the_sampler_is_ddim_and_the_banner_says_so(capsys):
    prof = get_profile("full", num_inference_steps=20)
    assert prof.scheduler == "DDIMScheduler" == DEFAULT_SCHEDULER
    assert "Sampling: DDIM sampler (diffusers DDIMScheduler), 20 steps, guidance 7.5." in capsys.readouterr().out


def test_quick_run_cuts_counts_and_keeps_models(monkeypatch, capsys):
    monkeypatch.delenv(QUICK_ENV, raising=False)
    full = get_profile("full", announce=False)
    quick = get_profile("full", quick=True)
    assert "QUICK RUN" in capsys.readouterr().out
    assert (quick.base_model, quick.ip_adapter, quick.eval_clip, quick.dataset, quick.resolution) == \
        (full.base_model, full.ip_adapter, full.eval_clip, full.dataset, full.resolution)
    assert quick.quick and not full.quick
    assert quick.max_train_steps == QUICK_TRAIN_STEPS and quick.num_epochs == 1
    assert quick.eval_num_references == quick.sample_references == QUICK_REFERENCES
    assert quick.eval_scales == (QUICK_SCALE,) and len(quick.eval_seeds) == 1
    assert quick.num_inference_steps == QUICK_INFERENCE_STEPS < full.num_inference_steps
    assert len(quick.sweep_scales) < len(full.sweep_scales)


def test_quick_from_environment_and_form_fields_still_win(monkeypatch):
    monkeypatch.setenv(QUICK_ENV, "1")
    prof = get_profile("full", announce=False, num_inference_steps=10, eval_num_references=5)
    assert prof.quick and prof.max_train_steps == QUICK_TRAIN_STEPS
    assert prof.num_inference_steps == 10 and prof.eval_num_references == 5  # the user's explicit values


def test_resolution_from_environment(monkeypatch):
    monkeypatch.setenv(RESOLUTION_ENV, "256")
    assert get_profile("full", announce=False).resolution == 256
    assert get_profile("full", announce=False, resolution=128).resolution == 128  # a form field still wins
    monkeypatch.setenv(RESOLUTION_ENV, "300")
    with pytest.raises(ValueError, match="IPA_RESOLUTION='300'.*multiple of 64"):
        get_profile("full", announce=False)


def test_full_in_colab_without_a_gpu_is_refused_before_anything_loads(monkeypatch):
    import sys
    import types

    from helpers.profile import ProfileError

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("IPA_PROFILE", raising=False)
    with pytest.raises(ProfileError, match="needs a GPU in Colab.*T4 GPU"):
        get_profile("full", announce=False)


def test_auto_falling_back_to_tiny_in_colab_says_so_loudly(monkeypatch, capsys):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("IPA_PROFILE", raising=False)
    assert get_profile("auto").name == "tiny"
    out = capsys.readouterr().out
    assert "THIS COLAB RUNTIME HAS NO GPU" in out and "RANDOM-weight" in out
    monkeypatch.delitem(sys.modules, "google.colab")
    get_profile("auto")
    assert "THIS COLAB RUNTIME HAS NO GPU" not in capsys.readouterr().out  # only in Colab
