"""The official IP-Adapter Plus layout <-> diffusers' modules: which keys name which live weights.

Official keys: `image_proj.*` for the Resampler (tencent-ailab's layout: `latents`, `proj_in`, `proj_out`,
`norm_out`, `layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}`, `layers.{i}.1.{0,1,3}`) and
`ip_adapter.{k}.to_{k,v}_ip.weight`, k = 1, 3, ..., 31 for SD 1.5 (`ip_adapter_layer_keys`). This project adds
`text_image_attn.*` (BLOCK_PREFIX) for the text-aware block.

    ip_adapter_layer_keys(unet)       official key id -> (attention processor name, width)
    adapter_parameters(unet)          the live adapter parameters by stable names (what training updates)
    adapter_state_dict(unet)          the adapter in the official flat format (what save_adapter writes)
    official_to_live(tensors)         official keys -> adapter_parameters names
    split_official(tensors)           flat keys -> {"image_proj": ..., "ip_adapter": ...}, diffusers' loader format
"""

from __future__ import annotations

import re

import torch

BLOCK_PREFIX = "text_image_attn."  # the text-aware block's tensors in an adapter file


def ip_adapter_layer_keys(unet) -> dict[int, tuple[str, int]]:
    """Official key id -> (attention processor name, hidden size) for every cross-attention layer.

    Mirrors diffusers' `_convert_ip_adapter_attn_to_diffusers`: processors in `unet.attn_processors`
    order, cross-attention ones (attn2) numbered 1, 3, 5, ...; the Resampler's own attention under
    `encoder_hid_proj.` is skipped. SD 1.5: 16 layers, ids 1..31.
    """
    keys, k = {}, 1
    for name in unet.attn_processors:
        if name.startswith("encoder_hid_proj.") or name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        keys[k] = (name, attn.to_q.in_features)
        k += 2
    return keys


# tencent-ailab Resampler layer keys -> diffusers' IPAdapterPlusImageProjection keys, by prefix, both ways
# (to_kv, a stacked (2 * inner, dim) matrix, is split into to_k and to_v: handled on its own)
_RESAMPLER_RENAME = {"0.norm1.": "ln0.", "0.norm2.": "ln1.", "0.to_q.weight": "attn.to_q.weight",
                     "0.to_out.weight": "attn.to_out.0.weight", "1.0.": "ff.0.", "1.1.weight": "ff.1.net.0.proj.weight",
                     "1.3.weight": "ff.1.net.2.weight"}


def resampler_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' IPAdapterPlusImageProjection state dict -> tencent-ailab Resampler keys (the inverse of
    diffusers' `_convert_ip_adapter_image_proj_to_diffusers`, and of resampler_from_official)."""
    def stack_kv(out, i, rest, value):  # to_k and to_v are stored stacked, as one (2 * inner, dim) to_kv
        if rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, sd[f"layers.{i}.attn.to_v.weight"]], dim=0)
        return rest in ("attn.to_k.weight", "attn.to_v.weight")

    return _rename_layers(sd, [(ours, official) for official, ours in _RESAMPLER_RENAME.items()], stack_kv)


def resampler_from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tencent-ailab Resampler keys -> diffusers' IPAdapterPlusImageProjection keys (what diffusers'
    `_convert_ip_adapter_image_proj_to_diffusers` does; the inverse of resampler_to_official)."""
    def split_kv(out, i, rest, value):  # (2 * inner, dim): to_k stacked on to_v
        if rest == "0.to_kv.weight":
            out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = value.chunk(2, dim=0)
        return rest == "0.to_kv.weight"

    return _rename_layers(sd, list(_RESAMPLER_RENAME.items()), split_kv)


def _rename_layers(sd: dict, renames: list[tuple[str, str]], special) -> dict:
    """Keys outside `layers.{i}.` as they are; inside, `special(out, i, rest, value)` handles a key (True) or
    the first matching (old prefix, new prefix) of `renames` renames it."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:  # latents, proj_in, proj_out, norm_out
            out[key] = value
            continue
        i, rest = m.groups()
        if special(out, i, rest, value):
            continue
        new = next((f"layers.{i}.{dst}{rest[len(src):]}" for src, dst in renames if rest.startswith(src)), None)
        if new is None:
            raise KeyError(f"unexpected Resampler key {key!r}")
        out[new] = value
    return out


def adapter_parameters(unet, *, block: bool = True) -> dict[str, torch.nn.Parameter]:
    """The live adapter parameters of a UNet with one IP-Adapter Plus loaded, by stable names:
    `image_proj.<diffusers Resampler name>` (~30M in SD 1.5 Plus), `ip_adapter.{k}.to_{k,v}_ip.0.weight`
    (k = 1, 3, ..., 31; ~19M) and, when the UNet is text-aware and `block` is True, `text_image_attn.*`.
    This is the one list of what training updates and what a model bank swaps (the bank passes
    block=False: it swaps the block as a whole module)."""
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    params = {f"image_proj.{n}": p for n, p in resampler.named_parameters()}
    procs = unet.attn_processors
    for k, (name, _) in ip_adapter_layer_keys(unet).items():
        params.update({f"ip_adapter.{k}.{n}": p for n, p in procs[name].named_parameters()})
    text_block = unet._modules.get("text_image_attn")
    if block and text_block is not None:
        params.update({BLOCK_PREFIX + n: p for n, p in text_block.named_parameters()})
    return params


def official_to_live(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's official keys -> the names of `adapter_parameters` (the block's keys are left out)."""
    out = {f"image_proj.{k}": v for k, v in resampler_from_official(
        {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}).items()}
    for key, value in tensors.items():
        m = re.fullmatch(r"ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight", key)
        if m:
            out[f"ip_adapter.{m.group(1)}.{m.group(2)}.0.weight"] = value
    return out


def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights of a UNet with an IP-Adapter Plus loaded, in the official flat format
    (+ `text_image_attn.*` when the UNet is text-aware), as detached CPU tensors."""
    if getattr(unet, "encoder_hid_proj", None) is None or unet.config.encoder_hid_dim_type != "ip_image_proj":
        raise ValueError("this UNet has no IP-Adapter loaded (load one with load_pipeline first)")
    layers = unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1:
        raise ValueError(f"expected one IP-Adapter, found {len(layers)}")
    sd = {f"image_proj.{k}": v for k, v in resampler_to_official(layers[0].state_dict()).items()}
    procs = unet.attn_processors
    for k, (name, _) in ip_adapter_layer_keys(unet).items():
        sd[f"ip_adapter.{k}.to_k_ip.weight"] = procs[name].to_k_ip[0].weight
        sd[f"ip_adapter.{k}.to_v_ip.weight"] = procs[name].to_v_ip[0].weight
    block = unet._modules.get("text_image_attn")
    if block is not None:
        sd.update({BLOCK_PREFIX + k: v for k, v in block.state_dict().items()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def split_official(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat official keys -> {"image_proj": {...}, "ip_adapter": {...}}, the dict diffusers' loader takes."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        group, _, rest = k.partition(".")
        if group in out:
            out[group][rest] = v
    return out
