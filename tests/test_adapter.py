"""helpers.adapter: vanilla is diffusers' own path, text-aware starts as vanilla, files round-trip, errors are clear."""
import os
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from helpers import tiny
from helpers.adapter import load_pipeline
from helpers.adapter_file import AdapterFileError, adapter_state_dict, save_adapter
from helpers.block import TextImageCrossAttention, recording_text_attention

PROMPT = "a cartoon drawing of a boy with blue hair"


def run(pipe, image, prompt=PROMPT, seed=0, **kw):
    kw = {"num_inference_steps": 2, "height": tiny.RESOLUTION, "width": tiny.RESOLUTION, **kw}
    return pipe(prompt, ip_adapter_image=image, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def make_text_aware_nonzero(pipe, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.text_image_attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def paths(tiny_profile):
    return tiny_profile.base_model, tiny_profile.ip_adapter


@pytest.fixture(scope="module")
def vanilla(paths):
    return load_pipeline(*paths, variant="vanilla")


@pytest.fixture(scope="module")
def text_aware(paths):
    return load_pipeline(*paths, variant="text_aware")


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


def test_text_aware_at_init_equals_vanilla(vanilla, text_aware, reference_image):
    assert text_aware.unet.text_image_attn is not None
    assert torch.equal(run(text_aware, reference_image), run(vanilla, reference_image))


def test_trained_block_changes_output_and_depends_on_prompt(paths, reference_image):
    pipe = load_pipeline(*paths, variant="text_aware")
    unet = pipe.unet
    embeds = pipe.prepare_ip_adapter_image_embeds(reference_image, None, "cpu", 1, False)
    text = {p: pipe.encode_prompt(p, "cpu", 1, False)[0] for p in ("a boy in space", "a cat on grass")}

    def tokens(prompt):
        return unet.process_encoder_hidden_states(text[prompt], {"image_embeds": embeds})[1][0]

    before = {p: tokens(p) for p in text}
    assert torch.equal(before["a boy in space"], before["a cat on grass"])  # vanilla tokens ignore the prompt
    make_text_aware_nonzero(pipe)
    after = {p: tokens(p) for p in text}
    assert not torch.allclose(after["a boy in space"], before["a boy in space"])
    assert not torch.allclose(after["a boy in space"], after["a cat on grass"])
    assert not torch.equal(run(pipe, reference_image), run(load_pipeline(*paths), reference_image))


def test_block_equals_torch_multihead_attention():
    """The hand-written block is standard multi-head attention: compare with torch.nn.MultiheadAttention."""
    torch.manual_seed(0)
    dim, text_dim, heads = 64, 48, 4
    block = TextImageCrossAttention(dim, text_dim, heads)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    mha = torch.nn.MultiheadAttention(dim, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
    with torch.no_grad():
        mha.q_proj_weight.copy_(block.to_q.weight)
        mha.k_proj_weight.copy_(block.to_k.weight)
        mha.v_proj_weight.copy_(block.to_v.weight)
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(block.to_out.weight)
        mha.out_proj.bias.copy_(block.to_out.bias)
    x, text = torch.randn(3, 16, dim), torch.randn(3, 77, text_dim)
    expected = x + mha(block.norm_image(x), block.norm_text(text), block.norm_text(text), need_weights=False)[0]
    torch.testing.assert_close(block(x, text), expected)
    # recorded attention: same output, weights are the per-head softmax over the 77 text tokens
    block.record_attention = True
    torch.testing.assert_close(block(x, text), expected)
    _, w = mha(block.norm_image(x), block.norm_text(text), block.norm_text(text), average_attn_weights=False)
    torch.testing.assert_close(block.attention_probs, w)


def test_each_half_of_a_guided_batch_attends_to_its_own_text():
    torch.manual_seed(0)
    block = TextImageCrossAttention(32, 32, 2)
    torch.nn.init.normal_(block.to_out.weight)
    x, text = torch.randn(2, 16, 32), torch.randn(2, 77, 32)  # rows: [negative, positive]
    both = block(x, text)
    for row in range(2):
        torch.testing.assert_close(both[row:row + 1], block(x[row:row + 1], text[row:row + 1]))
    # 4-D tokens (B, images, 16, D), as diffusers passes them, give the same per-image result
    torch.testing.assert_close(block(x[:, None], text)[:, 0], both)


def test_fresh_block_is_exactly_the_identity_and_fp16_safe():
    block = TextImageCrossAttention(64, 64, 4)
    x, text = torch.randn(2, 16, 64) * 30, torch.randn(2, 77, 64) * 30
    assert torch.equal(block(x, text), x)
    torch.nn.init.normal_(block.to_out.weight, std=0.5)
    ref = block(x, text)
    half = block.half()(x.half(), text.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), ref, atol=0.1, rtol=0.02)


def test_recording_attention_without_cost_when_off(text_aware, reference_image):
    block = text_aware.unet.text_image_attn
    run(text_aware, reference_image)
    assert block.attention_probs is None and not block.record_attention
    with recording_text_attention(text_aware) as rec:
        run(text_aware, reference_image, guidance_scale=7.5)
    probs = rec.attention_probs
    assert probs.shape == (2, block.heads, tiny.RESAMPLER_QUERIES, 77)  # [negative, positive] rows
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert not block.record_attention


@pytest.mark.parametrize("variant", ["vanilla", "text_aware"])
def test_save_load_round_trip(variant, paths, tmp_path, reference_image):
    pipe = load_pipeline(*paths, variant=variant)
    with torch.no_grad():  # move every adapter weight away from the pretrained file
        for p in pipe.unet.encoder_hid_proj.parameters():
            p.add_(0.01)
    if variant == "text_aware":
        make_text_aware_nonzero(pipe)
    path = save_adapter(pipe, tmp_path / "adapter.safetensors", metadata={"training_config": {"lr": 1e-4}})
    again = load_pipeline(*paths, variant=variant, adapter=path)
    a, b = adapter_state_dict(pipe.unet), adapter_state_dict(again.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_image_attn.") for k in a) == (variant == "text_aware")
    assert again.adapter_info["variant"] == variant and again.adapter_info["training_config"] == '{"lr": 0.0001}'
    assert torch.equal(run(again, reference_image), run(pipe, reference_image))


def test_saved_vanilla_file_loads_in_plain_diffusers(paths, tiny_root, tmp_path, reference_image):
    pipe = load_pipeline(*paths, variant="vanilla")
    with torch.no_grad():
        for proc in pipe.unet.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.to_k_ip[0].weight.mul_(1.5)
    save_adapter(pipe, tmp_path / "mine.safetensors")
    shutil.copytree(tiny_root / "ip_adapter" / "image_encoder", tmp_path / "image_encoder")
    plain = StableDiffusionPipeline.from_pretrained(tiny_root / "sd15", local_files_only=True)
    plain.load_ip_adapter(str(tmp_path), subfolder="", weight_name="mine.safetensors", image_encoder_folder="image_encoder")
    assert torch.equal(run(plain, reference_image), run(pipe, reference_image))


# ----------------------------------------------------------------------------------------------
# Clear errors, never silently dropped weights
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    return {v: save_adapter(load_pipeline(*paths, variant=v), folder / f"{v}.safetensors") for v in ("vanilla", "text_aware")}


def test_text_aware_file_refused_as_vanilla(paths, saved):
    with pytest.raises(AdapterFileError, match=r"text_aware.safetensors is a text-aware adapter .*variant='text_aware'"):
        load_pipeline(*paths, variant="vanilla", adapter=saved["text_aware"])


def test_vanilla_file_refused_as_text_aware(paths, saved):
    with pytest.raises(AdapterFileError, match=r"vanilla.safetensors is a vanilla adapter .*variant='vanilla'"):
        load_pipeline(*paths, variant="text_aware", adapter=saved["vanilla"])


def edited(src, dst, change):
    sd = load_file(str(src))
    change(sd)
    save_file(sd, str(dst))
    return dst


def test_missing_keys_are_named(paths, saved, tmp_path):
    bad = edited(saved["vanilla"], tmp_path / "missing.safetensors", lambda sd: sd.pop("ip_adapter.31.to_v_ip.weight"))
    with pytest.raises(AdapterFileError, match=r"(?s)missing.safetensors does not fit .*1 missing: ip_adapter.31.to_v_ip.weight"):
        load_pipeline(*paths, adapter=bad)


def test_misshaped_keys_are_named(paths, saved, tmp_path):
    def shrink(sd):
        sd["ip_adapter.1.to_k_ip.weight"] = sd["ip_adapter.1.to_k_ip.weight"][:, :8].contiguous()

    bad = edited(saved["vanilla"], tmp_path / "shape.safetensors", shrink)
    with pytest.raises(AdapterFileError, match=r"ip_adapter.1.to_k_ip.weight has shape \(32, 8\), expected \(32, 32\)"):
        load_pipeline(*paths, adapter=bad)


def test_misshaped_block_is_named(paths, saved, tmp_path):
    def shrink(sd):
        sd["text_image_attn.to_q.weight"] = sd["text_image_attn.to_q.weight"][:16].contiguous()

    bad = edited(saved["text_aware"], tmp_path / "block.safetensors", shrink)
    with pytest.raises(AdapterFileError, match=r"text_image_attn.to_q.weight has shape \(16, 32\)"):
        load_pipeline(*paths, variant="text_aware", adapter=bad)


def test_base_ip_adapter_and_garbage_files_are_refused(paths, tmp_path):
    base = tmp_path / "ip-adapter_sd15.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4 * 32, 16), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)}, str(base))
    with pytest.raises(AdapterFileError, match="base IP-Adapter .*IP-Adapter Plus"):
        load_pipeline(*paths, adapter=base)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(AdapterFileError, match="junk.safetensors: not a readable safetensors file"):
        load_pipeline(*paths, adapter=junk)
    with pytest.raises(AdapterFileError, match="nothing.safetensors: no such file"):
        load_pipeline(*paths, adapter=tmp_path / "nothing.safetensors")
    pickle = tmp_path / "evil.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}, "code": print}, pickle)  # not weights-only
    with pytest.raises(AdapterFileError, match="evil.bin: not a safetensors file nor a weights-only torch file"):
        load_pipeline(*paths, adapter=pickle)


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
