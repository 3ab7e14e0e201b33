"""Real Stable Diffusion 1.5 / IP-Adapter Plus shapes with random weights: for tests and benchmarks that
must see the real sizes (head counts, 64 x 64 latents, 257 x 1280 image features) without a download.

The sizes are the published configs' (helpers.model.sd15).
"""

from __future__ import annotations

import torch

from ..model.official_format import ip_adapter_layer_keys


def random_ip_adapter_plus(unet, *, image_encoder_dim: int, dim: int, queries: int = 16, depth: int = 4,
                           seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A random IP-Adapter Plus checkpoint with the official keys (tencent-ailab's Resampler layout).

    image_proj.latents (1, queries, dim), proj_in (dim <- image_encoder_dim), proj_out
    (cross_attention_dim <- dim), norm_out, and per layer i < depth: i.0 = PerceiverAttention(norm1, norm2,
    to_q, to_kv, to_out) with dim_head 64, i.1 = FeedForward(LayerNorm, Linear x4, GELU, Linear).
    ip_adapter.{k}.to_{k,v}_ip.weight (hidden, cross_attention_dim) for k = 1, 3, ... (ip_adapter_layer_keys).
    """
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape, s=scale):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "image_proj.latents": rand(1, queries, dim, s=dim**-0.5),
        "image_proj.proj_in.weight": rand(dim, image_encoder_dim),
        "image_proj.proj_in.bias": torch.zeros(dim),
        "image_proj.proj_out.weight": rand(cross, dim),
        "image_proj.proj_out.bias": torch.zeros(cross),
        "image_proj.norm_out.weight": torch.ones(cross),
        "image_proj.norm_out.bias": torch.zeros(cross),
    }
    for i in range(depth):
        p = f"image_proj.layers.{i}"
        for norm in ("norm1", "norm2"):
            sd[f"{p}.0.{norm}.weight"] = torch.ones(dim)
            sd[f"{p}.0.{norm}.bias"] = torch.zeros(dim)
        sd[f"{p}.0.to_q.weight"] = rand(dim, dim)
        sd[f"{p}.0.to_kv.weight"] = rand(2 * dim, dim)
        sd[f"{p}.0.to_out.weight"] = rand(dim, dim)
        sd[f"{p}.1.0.weight"] = torch.ones(dim)
        sd[f"{p}.1.0.bias"] = torch.zeros(dim)
        sd[f"{p}.1.1.weight"] = rand(4 * dim, dim)
        sd[f"{p}.1.3.weight"] = rand(dim, 4 * dim)
    for k, (_, hidden) in ip_adapter_layer_keys(unet).items():
        sd[f"ip_adapter.{k}.to_k_ip.weight"] = rand(hidden, cross)
        sd[f"ip_adapter.{k}.to_v_ip.weight"] = rand(hidden, cross)
    return sd


def no_init():
    """A context in which transformers and diffusers models are built without running their initialisers
    (then fill them with `random_init`)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int) -> None:
    """Fast, scale-preserving random weights: N(0, 1/fan_in) for matrices and kernels, zero biases, unit
    norms. Values are tiled from a pool of 1,000,003 (prime) normal draws: torch's seeded normal_ runs on
    one core (~30 s for these 1.5B parameters); shape and speed checks only need the right scale."""
    pool = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    m, offset = pool.numel(), 0
    for name, p in model.named_parameters():
        n = p.numel()
        parent = name.split(".")[-2] if "." in name else ""  # top-level parameters too (CLIPModel.logit_scale)
        if p.ndim >= 2 or not (name.endswith("bias") or "norm" in name or "ln" in parent):
            flat = p.view(-1)  # filled in place, chunk by chunk: this machine's page faults are slow
            for start in range(0, n, m):
                k = min(m, n - start)
                o = (offset + start) % (m - k + 1)
                flat[start:start + k].copy_(pool[o:o + k])
            p.mul_(p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02)
            offset += 7919
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
