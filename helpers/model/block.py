"""The idea of this project: IP-Adapter's image tokens attend to the prompt before the UNet reads them.

    TextImageCrossAttention           the block: x + to_out(MultiHeadAttention(q=LN(x), k=v=LN(text)))
    fresh_block(dim, heads)           a new block: an exact identity, seeded
    TextAwareUNet2DConditionModel     diffusers' UNet with the block applied to the IP-Adapter image tokens
    recording_text_attention(pipe)    keep the block's attention weights for plotting
    token_update(block, tokens, text) how much the block changes the image tokens: |update| / |tokens|
    block_effect(unet, embeds, text)  the same on the tokens the UNet's Resampler makes of image features

Vanilla IP-Adapter Plus is diffusers' own path: the Resampler in `unet.encoder_hid_proj` turns image features
into 16 tokens, and an `IPAdapterAttnProcessor2_0` in each of the 16 cross-attention layers adds
`scale * Attention(Q, to_k_ip(ip_tokens), to_v_ip(ip_tokens))` to the text cross-attention. Text-aware adds
one block before that: the 16 image tokens attend to the prompt's 77 text states, so the prompt can decide
what of the reference reaches the UNet.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn


class TextImageCrossAttention(nn.Module):
    """Image tokens attend to the prompt: `x + to_out(MultiHeadAttention(q=LN(x), k=v=LN(text)))`.

    x:    (B, N, D) or (B, M, N, D) image tokens from the Resampler (N = 16, D = 768 in SD 1.5 Plus;
          M reference images per prompt, as diffusers passes them)
    text: (B, L, C) text encoder hidden states (L = 77, C = 768)
    returns the same shape as x.

    Pre-norm, residual, and `to_out` starts at zero, so a fresh block is exactly the identity and a
    text-aware model starts out computing what the vanilla model computes. Row b of x attends only to
    row b of text: under classifier-free guidance the unconditional half reads the negative prompt.

    Set `record_attention = True` to keep the attention weights in `attention_probs`
    (B, heads, M*N, L): which text tokens each image token reads. Off by default, and then the block
    uses the fused `scaled_dot_product_attention` and stores nothing.
    """

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm_image = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(text_dim, dim, bias=False)
        self.to_v = nn.Linear(text_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        self.record_attention = False
        self.attention_probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.ndim == 4:  # (B, M, N, D) -> (B, M*N, D): queries are independent, so this is exact
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        b, n, d = x.shape
        h = self.heads
        text = text.to(x.dtype)
        q = self.to_q(self.norm_image(x)).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, d/h)
        t = self.norm_text(text)
        k = self.to_k(t).view(b, -1, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        v = self.to_v(t).view(b, -1, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        if self.record_attention:
            # softmax in fp32: the same maths as SDPA, kept for plotting
            scores = q.float() @ k.float().transpose(-1, -2) * (d // h) ** -0.5  # (B, h, N, L)
            probs = scores.softmax(dim=-1)
            self.attention_probs = probs.detach()
            out = (probs @ v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d/h)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return (x + self.to_out(out)).reshape(shape)


def fresh_block(dim: int, heads: int, seed: int = 0) -> TextImageCrossAttention:
    """A new block for image tokens and text states of width `dim`: an exact identity (to_out is zero) whose
    q/k/v initialisation is seeded, so the same pretrained adapter always gives the same text-aware starting
    point. The global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextImageCrossAttention(dim, dim, heads)


class TextAwareUNet2DConditionModel(UNet2DConditionModel):
    """diffusers' UNet with the text-image block applied to the IP-Adapter image tokens.

    Why here: `UNet2DConditionModel.forward` calls `process_encoder_hidden_states(text, added_cond_kwargs)`
    once per step; in the `ip_image_proj` branch it runs the Resampler on `added_cond_kwargs["image_embeds"]`
    and returns `(text, [ip_tokens])` to the attention processors. It is the only place where the text
    states and the image tokens are both in hand, before any decoupled cross-attention reads them.
    Overriding it in a subclass keeps everything else stock: the pipeline, schedulers, guidance,
    `set_ip_adapter_scale` and diffusers' `IPAdapterAttnProcessor2_0`, and the same code runs in
    training (calling the UNet directly) and in sampling (through the pipeline). Until
    `add_text_image_attn()` is called (or with no IP-Adapter loaded) it is exactly the stock UNet.
    """

    # `text_image_attn` is a submodule registered by add_text_image_attn() (no class attribute: it would
    # shadow the registered module); set it to None to get the stock UNet back.

    def add_text_image_attn(self, heads: int, seed: int = 0) -> TextImageCrossAttention:
        """Register a fresh block (identity at start, `fresh_block`) on the UNet's device and dtype."""
        dim = self.config.cross_attention_dim
        param = next(self.parameters())
        self.text_image_attn = fresh_block(dim, heads, seed).to(device=param.device, dtype=param.dtype)
        return self.text_image_attn

    def process_encoder_hidden_states(self, encoder_hidden_states, added_cond_kwargs):
        out = super().process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        block = self._modules.get("text_image_attn")
        if block is None or not isinstance(out, tuple):
            return out
        text, ip_tokens = out  # (B, 77, C), list of (B, [M,] 16, D), one per adapter
        return text, [block(tokens, text) for tokens in ip_tokens]


@contextlib.contextmanager
def recording_text_attention(pipe_or_unet):
    """Within the block, keep the text-image attention weights in `block.attention_probs`
    (B, heads, image tokens, 77). Yields the block."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    block = getattr(unet, "text_image_attn", None)
    if block is None:
        raise ValueError("this model has no text-image block (load it with variant='text_aware')")
    block.record_attention, block.attention_probs = True, None
    try:
        yield block
    finally:
        block.record_attention = False


@torch.no_grad()
def token_update(block: TextImageCrossAttention, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """How much the block changes the image tokens, per row: |block(x, text) - x| / |x|, Frobenius norms over
    all tokens and channels.

    tokens: (B, N, D) or (B, M, N, D) image tokens; text: (B, L, C) text states -> (B,) float32.
    Exactly 0 for a fresh block (to_out is zero); a trained block's value says how far the prompt moves the
    tokens that the decoupled cross-attention reads (0.1: by a tenth of their size).
    """
    update = (block(tokens, text) - tokens).float().flatten(1)  # (B, [M *] N * D)
    return update.norm(dim=1) / tokens.float().flatten(1).norm(dim=1)


@torch.no_grad()
def block_effect(unet: TextAwareUNet2DConditionModel, image_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`token_update` of the UNet's text-image block on the tokens its Resampler makes of image features.

    image_embeds: (B, M, 257, W) image-encoder features (as `added_cond_kwargs["image_embeds"][0]`);
    text: (B, 77, C) text states -> (B,) float32. The tokens are those the vanilla UNet would pass to the
    decoupled cross-attention (diffusers' own `process_encoder_hidden_states`).
    """
    block = unet._modules.get("text_image_attn")
    if block is None:
        raise ValueError("this UNet has no text-image block (a vanilla model): nothing to measure")
    _, (tokens,) = UNet2DConditionModel.process_encoder_hidden_states(unet, text, {"image_embeds": [image_embeds]})
    return token_update(block, tokens, text.to(tokens.dtype))
