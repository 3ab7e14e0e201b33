"""Notebook 02's pictures of the model: the architecture as boxes and arrows, and its parameters per part.

    data_flow_diagram(pipe)                  IP-Adapter Plus with the text-image block (a matplotlib Figure)
    parameter_counts(unet)                   parameters per part of a live UNet with the adapter
    sd15_parameter_counts()                  the same at SD 1.5 size, built on the meta device (no download)
    parameter_table(live, sd15, profile)     both beside the published figures (a pandas DataFrame)
"""

from __future__ import annotations

import torch

from .block import TextImageCrossAttention
from .official_format import adapter_parameters, ip_adapter_layer_keys
from .sd15 import RESAMPLER_DIM, SD15_UNET, VIT_H14

_FROZEN, _TRAINED, _NEW, _DATA, _ORANGE = "#e6e6e6", "#cfe3f7", "#fbd3a6", "white", "#c05a00"


def data_flow_diagram(pipe, *, random_weights: bool = False):
    """IP-Adapter Plus with the text-image block, as boxes and arrows: grey frozen, blue trained by IP-Adapter,
    orange new. Labels give SD 1.5's sizes, and with random_weights (tiny profile) also the live pipeline's,
    read from its configuration. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    enc = pipe.image_encoder.config
    resampler = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    live = {"features": f"{(enc.image_size // enc.patch_size) ** 2 + 1} × {enc.hidden_size}",
            "tokens": f"{resampler.latents.shape[1]} × {pipe.unet.config.cross_attention_dim}",
            "text": f"{pipe.tokenizer.model_max_length} × {pipe.text_encoder.config.hidden_size}"}

    def size(real, key):
        return real + (f"\n(tiny: {live[key]})" if random_weights else "")

    w, h = 2.6, 1.0
    boxes = {  # name: (x, y of the lower left corner, text, colour)
        "ref": (0.0, 3.0, "reference image", _DATA),
        "vit": (3.0, 3.0, "CLIP ViT-H/14\nimage encoder", _FROZEN),
        "feat": (6.0, 3.0, "penultimate features\n" + size("257 × 1280", "features"), _DATA),
        "res": (9.0, 3.0, "Resampler\n16 learned queries\n4 layers", _TRAINED),
        "tok": (12.0, 3.0, "image tokens\n" + size("16 × 768", "tokens"), _DATA),
        "new": (12.0, 1.5, "NEW: text-image attention\nimage tokens read\nthe prompt", _NEW),
        "prompt": (0.0, 0.0, "prompt", _DATA),
        "clipt": (3.0, 0.0, "CLIP text encoder", _FROZEN),
        "text": (6.0, 0.0, "text states\n" + size("77 × 768", "text"), _DATA),
        "unet": (15.8, 1.5, "UNet, 16 layers of\ndecoupled cross-attention\n(to_k_ip, to_v_ip trained)", _TRAINED),
        "img": (19.0, 1.5, "denoised latents\n→ VAE decoder → image", _FROZEN),
    }
    fig, ax = plt.subplots(figsize=(17, 4.8))
    for x, y, text, colour in boxes.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="black", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8)

    def anchor(name, side, shift=0.0):
        x, y = boxes[name][:2]
        return {"right": (x + w + 0.05, y + h / 2 + shift), "left": (x - 0.05, y + h / 2 + shift),
                "top": (x + w / 2 + shift, y + h + 0.05), "bottom": (x + w / 2 + shift, y - 0.05)}[side]

    def arrow(p, q, colour="black", style="-", connection="arc3"):
        ax.annotate("", xy=q, xytext=p, arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.4, linestyle=style,
                                                        connectionstyle=connection))

    for a, b in [("ref", "vit"), ("vit", "feat"), ("feat", "res"), ("res", "tok"), ("prompt", "clipt"),
                 ("clipt", "text"), ("unet", "img")]:
        arrow(anchor(a, "right"), anchor(b, "left"))
    arrow(anchor("tok", "bottom"), anchor("new", "top"), _ORANGE)  # text-aware: the tokens go through the new block
    arrow(anchor("text", "right", 0.2), anchor("new", "left"), _ORANGE)
    arrow(anchor("new", "right"), anchor("unet", "left"), _ORANGE)
    arrow(anchor("tok", "right"), anchor("unet", "top"), "grey", "--", "angle,angleA=0,angleB=90")  # vanilla
    arrow(anchor("text", "right", -0.2), anchor("unet", "bottom"), connection="angle,angleA=0,angleB=90")
    ax.text(14.8, 3.65, "vanilla: straight to the UNet", fontsize=8, color="grey", style="italic")
    ax.text(9.6, 1.3, "keys and values", fontsize=8, color=_ORANGE, rotation=22)
    ax.text(15.2, 1.65, "text-aware\ntokens", fontsize=8, color=_ORANGE, ha="center")
    ax.text(11.5, 0.05, "keys and values of the UNet's own text cross-attention", fontsize=8)
    ax.set_xlim(-0.2, 21.8)
    ax.set_ylim(-0.2, 4.3)
    ax.axis("off")
    ax.set_title("IP-Adapter Plus with the text-image block: grey frozen, blue trained by IP-Adapter, orange new")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.9)
    return fig


_PARTS = {"image_proj.": "Resampler", "ip_adapter.": "to_k_ip + to_v_ip (16 layers)",
          "text_image_attn.": "text-image block (new)"}

_PUBLISHED = {"Resampler": "29.9M (Plus Resampler)", "to_k_ip + to_v_ip (16 layers)": "19.17M (part of the 22M)",
              "text-image block (new)": "-", "UNet without adapter": "860M",
              "adapter, vanilla": "29.9M + 19.17M; base IP-Adapter: 22M", "adapter, text-aware": "-"}


def parameter_counts(unet) -> dict[str, int]:
    """Parameters per part of a UNet with IP-Adapter Plus loaded (helpers.model.official_format.adapter_parameters
    grouped: Resampler, to_k_ip + to_v_ip, text-image block), the UNet without them, and the adapter totals."""
    counts = dict.fromkeys([*_PARTS.values(), "UNet without adapter"], 0)
    for name, p in adapter_parameters(unet).items():
        counts[next(part for prefix, part in _PARTS.items() if name.startswith(prefix))] += p.numel()
    counts["UNet without adapter"] = sum(p.numel() for p in unet.parameters()) - sum(counts.values())
    counts["adapter, vanilla"] = counts["Resampler"] + counts["to_k_ip + to_v_ip (16 layers)"]
    counts["adapter, text-aware"] = counts["adapter, vanilla"] + counts["text-image block (new)"]
    return counts


def sd15_parameter_counts() -> dict[str, int]:
    """parameter_counts at SD 1.5 + IP-Adapter Plus size, from the published configs, built on PyTorch's
    `meta` device (shapes without storage: nothing downloaded or allocated)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    cross, queries = SD15_UNET["cross_attention_dim"], 16
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        parts = {
            "Resampler": IPAdapterPlusImageProjection(embed_dims=VIT_H14["hidden_size"], output_dims=cross,
                                                      hidden_dims=RESAMPLER_DIM, depth=4, dim_head=64,
                                                      heads=RESAMPLER_DIM // 64, num_queries=queries),
            "to_k_ip + to_v_ip (16 layers)": torch.nn.ModuleList(
                IPAdapterAttnProcessor2_0(h, cross, num_tokens=(queries,)) for _, h in ip_adapter_layer_keys(unet).values()),
            "text-image block (new)": TextImageCrossAttention(cross, cross, heads=RESAMPLER_DIM // 64),
            "UNet without adapter": unet,
        }
    counts = {part: sum(p.numel() for p in m.parameters()) for part, m in parts.items()}
    counts["adapter, vanilla"] = counts["Resampler"] + counts["to_k_ip + to_v_ip (16 layers)"]
    counts["adapter, text-aware"] = counts["adapter, vanilla"] + counts["text-image block (new)"]
    return counts


def parameter_table(live: dict[str, int], sd15: dict[str, int], profile_name: str):
    """parameter_counts of the live model beside sd15_parameter_counts and the published figures (Ye et al.,
    2023, and the IP-Adapter code), as a pandas DataFrame, one row per part."""
    import pandas as pd

    trains = {part: "yes" for part in _PARTS.values()} | {"UNet without adapter": "no (frozen)",
                                                           "adapter, vanilla": "", "adapter, text-aware": ""}
    return pd.DataFrame({"trains": trains, f"{profile_name} profile (live)": {k: f"{v:,}" for k, v in live.items()},
                         "SD 1.5 (meta device)": {k: f"{v / 1e6:,.2f}M" for k, v in sd15.items()},
                         "published": _PUBLISHED})
