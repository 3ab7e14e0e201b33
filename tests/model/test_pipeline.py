"""helpers.model.pipeline: vanilla is diffusers' own path, the UNet alone matches the pipeline's, real SD 1.5 shapes run."""
import os
import sys
from pathlib import Path

import pytest
import torch
from _adapters import run
from diffusers import DDIMScheduler, StableDiffusionPipeline

from helpers.model.pipeline import load_pipeline
from helpers.tiny.assets import IMAGE_ENCODER_DIM, IP_ADAPTER_FILE


def test_vanilla_equals_diffusers_own_path_bit_for_bit(tiny_root, vanilla, reference_image):
    ref = StableDiffusionPipeline.from_pretrained(tiny_root / "sd15", local_files_only=True)
    ref.load_ip_adapter(str(tiny_root / "ip_adapter"), subfolder="", weight_name=IP_ADAPTER_FILE,
                        image_encoder_folder="image_encoder", local_files_only=True)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)  # diffusers' documented way to pick a sampler
    assert type(vanilla.unet) is type(ref.unet)
    for scale in (1.0, 0.4):
        ref.set_ip_adapter_scale(scale)
        vanilla.set_ip_adapter_scale(scale)
        assert torch.equal(run(vanilla, reference_image), run(ref, reference_image))
    vanilla.set_ip_adapter_scale(1.0)


def test_real_sd15_shapes_one_denoising_step_both_variants():
    """SD 1.5 UNet (860M), ViT-H/14 encoder and Plus Resampler at their real sizes, random weights: one
    guided denoising step at 512 px. Catches head-count and shape mistakes the tiny sizes hide."""
    from helpers.model.sd15 import RESAMPLER_DIM, SD15_UNET, TEXT_LEN
    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))  # maintainers' code, beside the benchmarks
    from _real_size import real_size_models

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
    from helpers.model.pipeline import load_unet

    unet = load_unet(*paths, variant=variant, image_encoder_dim=IMAGE_ENCODER_DIM)
    pipe_unet = load_pipeline(*paths, variant=variant).unet
    a, b = unet.state_dict(), pipe_unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(p) for p in unet.attn_processors.values()] == [type(p) for p in pipe_unet.attn_processors.values()]


def test_sampler_is_ddim_whatever_the_base_model_ships(tiny_root, vanilla, text_aware, bank):
    """The tiny base ships SD 1.5's own scheduler config (PNDM); every pipeline samples with DDIM built from it."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from helpers.model.pipeline import make_scheduler

    shipped = PNDMScheduler.load_config(tiny_root / "sd15", subfolder="scheduler")
    assert shipped["_class_name"] == "PNDMScheduler" and shipped["steps_offset"] == 1
    for pipe in (vanilla, text_aware, bank.pipe):
        assert type(pipe.scheduler) is DDIMScheduler
        cfg = pipe.scheduler.config  # the base's schedule, the IP-Adapter paper's DDIM settings
        assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.steps_offset) == (0.00085, 0.012, "scaled_linear", 1)
        assert (cfg.set_alpha_to_one, cfg.clip_sample, cfg.timestep_spacing) == (False, False, "leading")
    pipe = load_pipeline(tiny_root / "sd15", tiny_root / "ip_adapter" / IP_ADAPTER_FILE, scheduler=None)
    assert type(pipe.scheduler) is PNDMScheduler  # None: the base model's own
    with pytest.raises(ValueError, match="'DDIM' is not a diffusers scheduler class"):
        make_scheduler(shipped, "DDIM")


@pytest.fixture(scope="module")
def base_with_fp16_files(tmp_path_factory, tiny_root):
    """The tiny base saved twice, as SD 1.5's repo is: default files, and fp16 files (`*.fp16.safetensors`)
    whose UNet conv_in bias is shifted by 1, so a test can tell which files were read."""
    folder = tmp_path_factory.mktemp("base_fp16") / "sd15"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_root / "sd15", local_files_only=True)
    pipe.save_pretrained(folder)
    with torch.no_grad():
        pipe.unet.conv_in.bias.add_(1.0)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    return folder, pipe.unet.conv_in.bias.detach().clone()


def test_fp16_loads_the_fp16_weight_files_where_the_repo_has_them(base_with_fp16_files, tiny_root, paths):
    from helpers.model.pipeline import load_unet

    folder, fp16_bias = base_with_fp16_files
    ip_adapter = paths[1]
    for variant in ("vanilla", "text_aware"):
        pipe = load_pipeline(folder, ip_adapter, variant=variant, device="cpu", dtype=torch.float16)
        assert pipe.unet.dtype == torch.float16 and pipe.adapter_info["base_weights"] == "fp16"
        assert torch.equal(pipe.unet.conv_in.bias, fp16_bias)  # the fp16 files, not the default ones
    unet = load_unet(folder, ip_adapter, variant="vanilla", image_encoder_dim=IMAGE_ENCODER_DIM, device="cpu",
                     dtype=torch.float16)
    assert torch.equal(unet.conv_in.bias, fp16_bias) and unet.adapter_info["base_weights"] == "fp16"
    # fp32 reads the default files; a base without fp16 files (a local folder, a community checkpoint) loads
    # its default files in fp16
    full = load_pipeline(folder, ip_adapter, device="cpu", dtype=torch.float32)
    assert full.adapter_info["base_weights"] == "default" and torch.allclose(full.unet.conv_in.bias + 1, fp16_bias.float(),
                                                                             atol=1e-3)
    plain = load_pipeline(tiny_root / "sd15", ip_adapter, device="cpu", dtype=torch.float16)
    assert plain.adapter_info["base_weights"] == "default" and plain.unet.dtype == torch.float16


def test_ddim_from_the_published_sd15_scheduler_config():
    """SD 1.5 ships PNDM (the published config, as the rehearsal mirror carries it); DDIM built from it keeps
    its schedule and takes the IP-Adapter paper's settings."""
    import json
    from pathlib import Path

    from diffusers import PNDMScheduler

    from helpers.model.pipeline import make_scheduler

    published = Path(__file__).parents[2] / "rehearsal/hub_files/stable-diffusion-v1-5--stable-diffusion-v1-5"
    config = json.loads((published / "scheduler/scheduler_config.json").read_text())
    pndm = PNDMScheduler.from_config(config)
    ddim = make_scheduler(pndm.config, "DDIMScheduler")
    assert type(ddim).__name__ == "DDIMScheduler" and ddim.config.steps_offset == 1 and not ddim.config.clip_sample
    assert torch.equal(ddim.alphas_cumprod, pndm.alphas_cumprod)
