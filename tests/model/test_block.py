"""helpers.model.block: the text-image block is attention done right, starts as the identity, and steers by the prompt."""
import torch
from _adapters import make_text_aware_nonzero, run

from helpers.model.block import TextImageCrossAttention, recording_text_attention
from helpers.model.pipeline import load_pipeline
from helpers.tiny.assets import RESAMPLER_QUERIES


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
    assert probs.shape == (2, block.heads, RESAMPLER_QUERIES, 77)  # [negative, positive] rows
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert not block.record_attention


def test_token_update_is_zero_fresh_and_measures_the_change_after(text_aware, reference_image):
    from helpers.model.block import block_effect, token_update

    torch.manual_seed(0)
    block = TextImageCrossAttention(32, 32, 2)
    x, text = torch.randn(3, 16, 32), torch.randn(3, 77, 32)
    assert torch.equal(token_update(block, x, text), torch.zeros(3))  # a fresh block changes nothing
    torch.nn.init.normal_(block.to_out.weight, std=0.3)
    by_hand = torch.stack([(block(x[i:i + 1], text[i:i + 1]) - x[i:i + 1]).norm() / x[i].norm() for i in range(3)])
    torch.testing.assert_close(token_update(block, x, text), by_hand.detach())
    # through the UNet: the tokens the Resampler makes of the reference's features, one prompt at a time
    unet = text_aware.unet
    embeds = text_aware.prepare_ip_adapter_image_embeds(reference_image, None, "cpu", 1, False)[0]  # (1, 1, 257, W)
    prompt = text_aware.encode_prompt("a boy in space", "cpu", 1, False)[0]
    assert block_effect(unet, embeds, prompt).item() == 0.0  # the pipeline's block is fresh
    tokens = unet.process_encoder_hidden_states(prompt, {"image_embeds": [embeds]})[1][0]  # fresh: = vanilla's
    saved = {k: v.clone() for k, v in unet.text_image_attn.state_dict().items()}
    try:
        torch.nn.init.normal_(unet.text_image_attn.to_out.weight, std=0.3)
        torch.testing.assert_close(block_effect(unet, embeds, prompt), token_update(unet.text_image_attn, tokens, prompt))
        assert block_effect(unet, embeds, prompt).item() > 0
    finally:
        unet.text_image_attn.load_state_dict(saved)


def test_bank_block_effect_per_reference_and_prompt(bank, reference_image):
    rows = bank.block_effect({"r": reference_image}, ["a cat", "a robot in space"])
    assert [(r["reference"], r["prompt"]) for r in rows] == [("r", "a cat"), ("r", "a robot in space")]
    assert all(r["update / tokens"] > 0 for r in rows)  # the test adapter's block is not the identity
    assert rows[0]["update / tokens"] != rows[1]["update / tokens"]  # it reads the prompt
    import pytest

    with pytest.raises(ValueError, match="'pretrained' is not a text-aware model"):
        bank.block_effect({"r": reference_image}, ["a cat"], name="pretrained")
