"""The official IP-Adapter Plus file format <-> diffusers modules, and this project's adapter file.

Official keys: `image_proj.*` for the Resampler (tencent-ailab's layout: `latents`, `proj_in`, `proj_out`,
`norm_out`, `layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}`, `layers.{i}.1.{0,1,3}`) and
`ip_adapter.{k}.to_{k,v}_ip.weight`, k = 1, 3, ..., 31 for SD 1.5 (`ip_adapter_layer_keys`).

A saved adapter (`save_adapter`, either variant) is one .safetensors file in that format, plus
`text_image_attn.*` for the text-aware variant, plus string metadata (variant, base model, training config).
A vanilla file loads in plain diffusers: `pipe.load_ip_adapter(folder, subfolder="", weight_name=file)`.

    adapter_parameters(unet)          the live adapter parameters by stable names (what training updates)
    adapter_state_dict(unet)          the adapter in the official flat format (what save_adapter writes)
    official_to_live(tensors)         official keys -> adapter_parameters names
    read_adapter_file / check_adapter_tensors / split_official    reading one back, checked
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .block import TextImageCrossAttention

BLOCK_PREFIX = "text_image_attn."
ADAPTER_FILE = "adapter.safetensors"  # the file name notebook 03 and the training CLI write in a run folder


class AdapterFileError(ValueError):
    """An adapter file that cannot be used as asked; the message names the file and what to do."""


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
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:  # latents, proj_in, proj_out, norm_out
            out[key] = value
            continue
        i, rest = m.groups()
        if rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, sd[f"layers.{i}.attn.to_v.weight"]], dim=0)
            continue
        if rest == "attn.to_v.weight":
            continue  # stored with to_k as to_kv
        for official, ours in _RESAMPLER_RENAME.items():
            if rest.startswith(ours):
                out[f"layers.{i}.{official}{rest[len(ours):]}"] = value
                break
        else:
            raise KeyError(f"unexpected Resampler key {key!r}")
    return out


def resampler_from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tencent-ailab Resampler keys -> diffusers' IPAdapterPlusImageProjection keys (what diffusers'
    `_convert_ip_adapter_image_proj_to_diffusers` does; the inverse of resampler_to_official)."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:  # latents, proj_in, proj_out, norm_out
            out[key] = value
            continue
        i, rest = m.groups()
        if rest == "0.to_kv.weight":  # (2 * inner, dim): to_k stacked on to_v
            out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = value.chunk(2, dim=0)
            continue
        for old, new in _RESAMPLER_RENAME.items():
            if rest.startswith(old):
                out[f"layers.{i}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise KeyError(f"unexpected Resampler key image_proj.{key}")
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


def save_adapter(pipe, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write the pipeline's adapter to one .safetensors file (official keys + text_image_attn.* + metadata).

    Written to a temporary file and renamed, so an interrupted save never leaves a broken file.
    `metadata` values that are not strings are stored as JSON.
    """
    from safetensors.torch import save_file

    unet = getattr(pipe, "unet", pipe)
    tensors = adapter_state_dict(unet)
    block = unet._modules.get("text_image_attn")
    meta = {
        "format": "ip-adapter-plus",
        "variant": "text_aware" if block is not None else "vanilla",
        "base_model": str(getattr(pipe, "name_or_path", "") or unet.config.get("_name_or_path", "") or ""),
    }
    if block is not None:
        meta["text_image_attn_heads"] = str(block.heads)
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file. Reads .safetensors, or a torch pickle with
    `weights_only=True` (the official .bin layout {"image_proj": ..., "ip_adapter": ...})."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means the same thing to the user)
        raise AdapterFileError(f"{path}: not a safetensors file nor a weights-only torch file ({e})") from None
    if not (isinstance(obj, dict) and set(obj) >= {"image_proj", "ip_adapter"}):
        raise AdapterFileError(f"{path}: expected a dict with 'image_proj' and 'ip_adapter'")
    return {f"{group}.{k}": v for group in ("image_proj", "ip_adapter") for k, v in obj[group].items()}, {}


def check_adapter_tensors(tensors, unet, *, image_encoder_dim: int, variant: str, path, as_finetuned: bool) -> None:
    """Raise AdapterFileError unless `tensors` fit this UNet and image encoder exactly.

    as_finetuned: the file is passed as `adapter=` (a save_adapter file). Then a text-aware request needs
    the file's text_image_attn.* weights; a pretrained file passed as `ip_adapter=` starts the block at zero.
    """
    cross = unet.config.cross_attention_dim
    problems = []
    image_proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    if not image_proj and not any(k.startswith("ip_adapter.") for k in tensors):
        raise AdapterFileError(f"{path}: no image_proj.* or ip_adapter.* tensors: this is not an IP-Adapter file")
    if "latents" not in image_proj:
        kind = "the base IP-Adapter (4 tokens)" if "proj.weight" in image_proj else "not IP-Adapter Plus"
        raise AdapterFileError(f"{path}: image_proj has no 'latents': this is {kind}; this project needs an "
                               "IP-Adapter Plus file such as ip-adapter-plus_sd15.safetensors")
    required = ["latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
                "norm_out.bias"] + [f"layers.{i}.{n}" for i in range(4) for n in (
                    "0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias", "0.to_q.weight",
                    "0.to_kv.weight", "0.to_out.weight", "1.0.weight", "1.0.bias", "1.1.weight", "1.3.weight")]
    missing = [f"image_proj.{k}" for k in required if k not in image_proj]
    extra = [f"image_proj.{k}" for k in image_proj if k not in required]
    if not missing:
        if image_proj["proj_out.weight"].shape[0] != cross:
            problems.append(f"image_proj.proj_out.weight has shape {tuple(image_proj['proj_out.weight'].shape)}: "
                            f"it makes tokens of width {image_proj['proj_out.weight'].shape[0]}, the UNet reads {cross}")
        if image_proj["proj_in.weight"].shape[1] != image_encoder_dim:
            problems.append(f"image_proj.proj_in.weight has shape {tuple(image_proj['proj_in.weight'].shape)}: "
                            f"it reads features of width {image_proj['proj_in.weight'].shape[1]}, the image "
                            f"encoder gives {image_encoder_dim}")
    for k, (_, hidden) in ip_adapter_layer_keys(unet).items():
        for kv in ("k", "v"):
            key = f"ip_adapter.{k}.to_{kv}_ip.weight"
            if key not in tensors:
                missing.append(key)
            elif tuple(tensors[key].shape) != (hidden, cross):
                problems.append(f"{key} has shape {tuple(tensors[key].shape)}, expected {(hidden, cross)}")
    expected_ip = {f"ip_adapter.{k}.to_{kv}_ip.weight" for k in ip_adapter_layer_keys(unet) for kv in "kv"}
    extra += [k for k in tensors if k.startswith("ip_adapter.") and k not in expected_ip]
    block_keys = {k for k in tensors if k.startswith(BLOCK_PREFIX)}
    extra += [k for k in tensors if not k.startswith(("image_proj.", "ip_adapter.", BLOCK_PREFIX))]
    if variant == "vanilla" and block_keys:
        raise AdapterFileError(
            f"{path} is a text-aware adapter ({len(block_keys)} text_image_attn.* tensors) but variant='vanilla' was "
            "asked for: load it with variant='text_aware' (loading it as vanilla would silently drop its "
            "text-image block)")
    if variant == "text_aware" and as_finetuned and not block_keys:
        raise AdapterFileError(
            f"{path} is a vanilla adapter (no text_image_attn.* tensors) but variant='text_aware' was asked for: "
            "load it with variant='vanilla', or pass it as ip_adapter=... to start a text-aware model from it "
            "(the new block then starts at zero)")
    if variant == "text_aware" and block_keys:
        heads = 1  # shapes of the block do not depend on heads
        ref = TextImageCrossAttention(cross, cross, heads).state_dict()
        for k, v in ref.items():
            key = BLOCK_PREFIX + k
            if key not in tensors:
                missing.append(key)
            elif tensors[key].shape != v.shape:
                problems.append(f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(v.shape)}")
        extra += [k for k in block_keys if k[len(BLOCK_PREFIX):] not in ref]
    if missing or extra or problems:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            lines.append(f"{len(extra)} unexpected: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        lines += problems[:6]
        n = len(ip_adapter_layer_keys(unet))
        raise AdapterFileError(
            f"{path} does not fit this model (a UNet with {n} cross-attention layers of width {cross}, an image "
            f"encoder of width {image_encoder_dim}):\n  - " + "\n  - ".join(lines) +
            "\nWas it saved for another base model or adapter type? Use the base model and IP-Adapter Plus "
            "weights it was trained with.")
