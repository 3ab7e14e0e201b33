"""SD 1.5 + IP-Adapter Plus at their real sizes with random weights, for benchmarks and the real-size test: no
download, built in seconds (helpers.tiny.shapes.no_init + random_init). Maintainers' code: nothing at run
time needs it, so it lives beside the benchmarks, not in the package."""

from __future__ import annotations

import torch

from helpers.model.block import TextAwareUNet2DConditionModel
from helpers.model.official_format import split_official
from helpers.model.sd15 import RESAMPLER_DIM, SD15_UNET, VIT_H14
from helpers.support.compat import load_ip_adapter_weights
from helpers.tiny.shapes import no_init, random_init, random_ip_adapter_plus


def real_size_models(variant: str = "vanilla", *, dtype=torch.float32, device="cpu", seed: int = 0):
    """(unet, image_encoder) at SD 1.5 / ViT-H/14 size with random weights and a random IP-Adapter Plus
    loaded through diffusers' own loader; variant "text_aware" adds the text-image block (12 heads)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with no_init():  # the libraries' own initialisers take ~30 s for these 1.5B parameters on a CPU
        unet = TextAwareUNet2DConditionModel(**SD15_UNET)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H14))
    random_init(unet, seed)
    random_init(encoder, seed + 1)
    sd = random_ip_adapter_plus(unet, image_encoder_dim=VIT_H14["hidden_size"], dim=RESAMPLER_DIM, seed=seed)
    load_ip_adapter_weights(unet, split_official(sd))
    if variant == "text_aware":
        unet.add_text_image_attn(heads=RESAMPLER_DIM // 64)
    return unet.to(device=device, dtype=dtype).eval(), encoder.to(device=device, dtype=dtype).eval()
