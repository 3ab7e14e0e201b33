"""helpers.adapter: vanilla is diffusers' own path, the UNet alone matches the pipeline's, real SD 1.5 shapes run."""
import os

import pytest
import torch
from _adapters import run
from diffusers import StableDiffusionPipeline

from helpers import tiny
from helpers.adapter import load_pipeline


def test_vanilla_equals_diffusers_own_path_bit_for_bit(tiny_root, vanilla, reference_image):
    ref = StableDiffusionPipeline.from_pretrained(tiny_root / "sd15", local_files_only=True)
    ref.load_ip_adapter(str(tiny_root / "ip_adapter"), subfolder="", weight_name=tiny.IP_ADAPTER_FILE,
                        image_encoder_folder="image_encoder", local_files_only=True)
    assert type(vanilla.unet) is type(ref.unet)
    for scale in (1.0, 0.4):
        ref.set_ip_adapter_scale(scale)
        vanilla.set_ip_adapter_scale(scale)
        assert torch.equal(run(vanilla, reference_image), run(ref, reference_image))
    vanilla.set_ip_adapter_scale(1.0)


def test_real_sd15_shapes_one_denoising_step_both_variants():
    """SD 1.5 UNet (860M), ViT-H/14 encoder and Plus Resampler at their real sizes, random weights: one
    guided denoising step at 512 px. Catches head-count and shape mistakes the tiny sizes hide."""
    from helpers.shapes import RESAMPLER_DIM, SD15_UNET, TEXT_LEN, real_size_models

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # run.sh pins tiny runs to 1 thread; this one is big
    try:
        _real_size_step(real_size_models, RESAMPLER_DIM, SD15_UNET, TEXT_LEN)
    finally:
        torch.set_num_threads(threads)


def _real_size_step(real_size_models, RESAMPLER_DIM, SD15_UNET, TEXT_LEN):
    unet, encoder = real_size_models("vanilla")
    assert sum(p.numel() for n, p in unet.named_parameters() if not n.startswith("encoder_hid_proj")) > 8.5e8
    with torch.no_grad():  # batch 1: guided batches are covered at tiny size
        feats = encoder(torch.randn(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        assert feats.shape == (1, 257, 1280)
        latents = torch.randn(1, 4, 64, 64)  # 512 px
        text = torch.randn(1, TEXT_LEN, SD15_UNET["cross_attention_dim"])
        cond = {"image_embeds": [feats[:, None]]}
        tokens = unet.process_encoder_hidden_states(text, cond)[1][0]
        assert tokens.shape == (1, 1, 16, RESAMPLER_DIM)
        out_vanilla = unet(latents, 999, encoder_hidden_states=text, added_cond_kwargs=cond).sample
        block = unet.add_text_image_attn(heads=12)
        assert block.heads == 12 and block.to_q.weight.shape == (768, 768)
        torch.nn.init.normal_(block.to_out.weight, std=0.02)
        out_text_aware = unet(latents, 999, encoder_hidden_states=text, added_cond_kwargs=cond).sample
    assert out_vanilla.shape == out_text_aware.shape == (1, 4, 64, 64)
    assert torch.isfinite(out_text_aware).all() and not torch.equal(out_vanilla, out_text_aware)


@pytest.mark.parametrize("variant", ["vanilla", "text_aware"])
def test_load_unet_matches_the_pipelines_unet(paths, variant):
    """Training builds the UNet alone (no VAE/encoders); it must be the same model load_pipeline builds."""
    from helpers.adapter import load_unet

    unet = load_unet(*paths, variant=variant, image_encoder_dim=tiny.IMAGE_ENCODER_DIM)
    pipe_unet = load_pipeline(*paths, variant=variant).unet
    a, b = unet.state_dict(), pipe_unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(p) for p in unet.attn_processors.values()] == [type(p) for p in pipe_unet.attn_processors.values()]


def test_sampler_is_the_profiles_built_from_the_base_models_schedule(vanilla):
    """SD 1.5 ships PNDM; the pipelines sample with the profile's DDIM, built from SD 1.5's own config."""
    import json
    from pathlib import Path

    from diffusers import PNDMScheduler

    from helpers.adapter import set_sampler
    from helpers.profile import SAMPLER

    assert type(vanilla.scheduler).__name__ == f"{SAMPLER}Scheduler"
    published = Path(__file__).parents[1] / "rehearsal/hub_files/stable-diffusion-v1-5--stable-diffusion-v1-5"
    pndm = PNDMScheduler.from_config(json.loads((published / "scheduler/scheduler_config.json").read_text()))
    holder = type("Pipe", (), {"scheduler": pndm})()
    set_sampler(holder, "DDIM")
    ddim = holder.scheduler
    assert type(ddim).__name__ == "DDIMScheduler" and ddim.config.steps_offset == 1 and not ddim.config.clip_sample
    assert torch.equal(ddim.alphas_cumprod, pndm.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown sampler 'Nope'"):
        set_sampler(holder, "Nope")
