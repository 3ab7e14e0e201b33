"""This project's adapter file: one .safetensors in the official IP-Adapter Plus layout, written, read back,
checked against the model it is loaded into, and found by name.

A saved adapter (`save_adapter`, either variant) holds the official keys (helpers.model.official_format), plus
`text_image_attn.*` for the text-aware variant, plus string metadata (format, variant, base model, training
recipe). A vanilla file loads in plain diffusers: `pipe.load_ip_adapter(folder, subfolder="", weight_name=file)`.

    save_adapter(pipe, path)                   write it (atomically)
    tensors, meta = read_adapter_file(path)    read it (or the official .bin / .safetensors)
    check_adapter_tensors(tensors, unet, ...)  every key and shape against the UNet and image encoder
    block = text_image_block(tensors, meta, unet)   the text-aware block it holds, built once for every caller
    path = resolve_adapter("user/name")        a file, a run folder, or a Hub repo -> the adapter file
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..support.atomic import replacing
from ..support.loading import torch_weights
from ..support.locations import split_hub_name
from .block import TextImageCrossAttention, fresh_block
from .official_format import BLOCK_PREFIX, adapter_state_dict, ip_adapter_layer_keys

ADAPTER_FILE = "adapter.safetensors"  # the file name notebook 03 and the training CLI write in a run folder
ADAPTER_FORMAT = "ip-adapter-plus"  # the "format" metadata save_adapter writes
# the Resampler's official keys: top level, then per layer (tencent-ailab's PerceiverAttention + FeedForward)
RESAMPLER_KEYS = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
                  "norm_out.bias")
RESAMPLER_LAYER_KEYS = ("0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias", "0.to_q.weight",
                        "0.to_kv.weight", "0.to_out.weight", "1.0.weight", "1.0.bias", "1.1.weight", "1.3.weight")


class AdapterFileError(ValueError):
    """An adapter file that cannot be used as asked; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------------


def save_adapter(pipe, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write the pipeline's (or UNet's) adapter to one .safetensors file: official keys, text_image_attn.*
    and metadata. Atomic, so an interrupted save never leaves a broken file. `metadata` values that are not
    strings are stored as JSON."""
    from safetensors.torch import save_file

    unet = getattr(pipe, "unet", pipe)
    tensors = adapter_state_dict(unet)
    block = unet._modules.get("text_image_attn")
    meta = {
        "format": ADAPTER_FORMAT,
        "variant": "text_aware" if block is not None else "vanilla",
        "base_model": str(getattr(pipe, "name_or_path", "") or unet.config.get("_name_or_path", "") or ""),
    }
    if block is not None:
        meta["text_image_attn_heads"] = str(block.heads)
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file. Reads .safetensors, or a torch pickle with
    `weights_only=True` (the official .bin layout {"image_proj": ..., "ip_adapter": ...}); a pickle that
    holds anything but tensors is refused with AdapterFileError (helpers.support.loading.torch_weights)."""
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
    obj = torch_weights(path, error_type=AdapterFileError, what="adapter file")  # our message for a refused pickle
    if not (isinstance(obj, dict) and set(obj) >= {"image_proj", "ip_adapter"}):
        raise AdapterFileError(f"{path}: expected a dict with 'image_proj' and 'ip_adapter'")
    return {f"{group}.{k}": v for group in ("image_proj", "ip_adapter") for k, v in obj[group].items()}, {}


def adapter_variant(path) -> str:
    """'text_aware' or 'vanilla', from the file's metadata (or its text_image_attn.* tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta, keys = f.metadata() or {}, list(f.keys())
    return meta.get("variant") or ("text_aware" if any(k.startswith(BLOCK_PREFIX) for k in keys) else "vanilla")


def text_image_block(tensors: dict, meta: dict, unet) -> TextImageCrossAttention:
    """The text-image block an adapter file holds, on the UNet's device and dtype: as many heads as the file
    says (else as the Resampler: 12 for SD 1.5 Plus), its weights, or zero-initialised (an identity) when the
    file has none (a pretrained adapter that starts a text-aware model)."""
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    heads = int(meta.get("text_image_attn_heads", resampler.layers[0].attn.heads))
    param = next(unet.parameters())
    block = fresh_block(unet.config.cross_attention_dim, heads)
    weights = {k[len(BLOCK_PREFIX):]: v for k, v in tensors.items() if k.startswith(BLOCK_PREFIX)}
    if weights:
        block.load_state_dict(weights, strict=True)
    return block.to(device=param.device, dtype=param.dtype)


# --------------------------------------------------------------------------------------------------
# Checking a file against the model it goes into
# --------------------------------------------------------------------------------------------------


def check_adapter_tensors(tensors, unet, *, image_encoder_dim: int, variant: str, path, as_finetuned: bool) -> None:
    """Raise AdapterFileError unless `tensors` fit this UNet and image encoder exactly.

    as_finetuned: the file is passed as `adapter=` (a save_adapter file). Then a text-aware request needs
    the file's text_image_attn.* weights; a pretrained file passed as `ip_adapter=` starts the block at zero.
    """
    image_proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    _check_kind(image_proj, tensors, path)
    _check_variant(tensors, variant, as_finetuned, path)
    missing, extra, problems = _resampler_problems(image_proj, unet.config.cross_attention_dim, image_encoder_dim)
    for found in (_ip_layer_problems(tensors, unet), _block_problems(tensors, unet, variant)):
        missing, extra, problems = missing + found[0], extra + found[1], problems + found[2]
    extra += [k for k in tensors if not k.startswith(("image_proj.", "ip_adapter.", BLOCK_PREFIX))]
    if missing or extra or problems:
        raise AdapterFileError(_misfit_message(path, unet, image_encoder_dim, missing, extra, problems))


def _check_kind(image_proj: dict, tensors: dict, path) -> None:
    """An IP-Adapter Plus file at all (a Resampler with latents), not the base IP-Adapter or something else."""
    if not image_proj and not any(k.startswith("ip_adapter.") for k in tensors):
        raise AdapterFileError(f"{path}: no image_proj.* or ip_adapter.* tensors: this is not an IP-Adapter file")
    if "latents" not in image_proj:
        kind = "the base IP-Adapter (4 tokens)" if "proj.weight" in image_proj else "not IP-Adapter Plus"
        raise AdapterFileError(f"{path}: image_proj has no 'latents': this is {kind}; this project needs an "
                               "IP-Adapter Plus file such as ip-adapter-plus_sd15.safetensors")


def _check_variant(tensors: dict, variant: str, as_finetuned: bool, path) -> None:
    """The variant asked for matches the file: a text-aware file is never loaded as vanilla (its block would
    be dropped without a word), and a vanilla file passed as adapter= is not text-aware."""
    block_keys = [k for k in tensors if k.startswith(BLOCK_PREFIX)]
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


def _resampler_problems(image_proj: dict, cross: int, image_encoder_dim: int):
    """(missing, extra, wrong shapes) of the Resampler's keys, and whether its widths fit the UNet and encoder."""
    required = list(RESAMPLER_KEYS) + [f"layers.{i}.{n}" for i in range(4) for n in RESAMPLER_LAYER_KEYS]
    missing = [f"image_proj.{k}" for k in required if k not in image_proj]
    extra = [f"image_proj.{k}" for k in image_proj if k not in required]
    problems = []
    if not missing:
        out_w, in_w = image_proj["proj_out.weight"].shape, image_proj["proj_in.weight"].shape
        if out_w[0] != cross:
            problems.append(f"image_proj.proj_out.weight has shape {tuple(out_w)}: it makes tokens of width "
                            f"{out_w[0]}, the UNet reads {cross}")
        if in_w[1] != image_encoder_dim:
            problems.append(f"image_proj.proj_in.weight has shape {tuple(in_w)}: it reads features of width "
                            f"{in_w[1]}, the image encoder gives {image_encoder_dim}")
    return missing, extra, problems


def _ip_layer_problems(tensors: dict, unet):
    """(missing, extra, wrong shapes) of the to_k_ip / to_v_ip weights, one pair per cross-attention layer."""
    cross = unet.config.cross_attention_dim
    layers = ip_adapter_layer_keys(unet)
    missing, problems = [], []
    for k, (_, hidden) in layers.items():
        for kv in ("k", "v"):
            key = f"ip_adapter.{k}.to_{kv}_ip.weight"
            if key not in tensors:
                missing.append(key)
            elif tuple(tensors[key].shape) != (hidden, cross):
                problems.append(f"{key} has shape {tuple(tensors[key].shape)}, expected {(hidden, cross)}")
    expected = {f"ip_adapter.{k}.to_{kv}_ip.weight" for k in layers for kv in "kv"}
    extra = [k for k in tensors if k.startswith("ip_adapter.") and k not in expected]
    return missing, extra, problems


def _block_problems(tensors: dict, unet, variant: str):
    """(missing, extra, wrong shapes) of a text-aware file's block (its shapes do not depend on the heads)."""
    block_keys = {k for k in tensors if k.startswith(BLOCK_PREFIX)}
    if variant != "text_aware" or not block_keys:
        return [], [], []
    cross = unet.config.cross_attention_dim
    ref = TextImageCrossAttention(cross, cross, heads=1).state_dict()
    missing = [BLOCK_PREFIX + k for k in ref if BLOCK_PREFIX + k not in tensors]
    problems = [f"{BLOCK_PREFIX + k} has shape {tuple(tensors[BLOCK_PREFIX + k].shape)}, expected {tuple(v.shape)}"
                for k, v in ref.items() if BLOCK_PREFIX + k in tensors and tensors[BLOCK_PREFIX + k].shape != v.shape]
    extra = [k for k in block_keys if k[len(BLOCK_PREFIX):] not in ref]
    return missing, extra, problems


def _misfit_message(path, unet, image_encoder_dim: int, missing, extra, problems) -> str:
    def listed(keys):
        return f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"

    lines = ([f"{len(missing)} missing: {listed(missing)}"] if missing else []) + (
        [f"{len(extra)} unexpected: {listed(extra)}"] if extra else []) + problems[:6]
    return (f"{path} does not fit this model (a UNet with {len(ip_adapter_layer_keys(unet))} cross-attention layers "
            f"of width {unet.config.cross_attention_dim}, an image encoder of width {image_encoder_dim}):\n  - "
            + "\n  - ".join(lines) + "\nWas it saved for another base model or adapter type? Use the base model "
            "and IP-Adapter Plus weights it was trained with.")


# --------------------------------------------------------------------------------------------------
# Finding one by name: a file, a folder, or a Hub repo
# --------------------------------------------------------------------------------------------------


def check_saved_adapter(path: Path, name: str) -> dict[str, str]:
    """Raise AdapterFileError unless `path` is a safetensors file written by save_adapter (metadata
    format=ip-adapter-plus, image_proj.* and ip_adapter.* tensors). `name` is what the user passed (a folder
    or a Hub id), so the message names it. Returns the file's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, keys = dict(f.metadata() or {}), list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{name}: {path.name} is not a readable safetensors file ({e})") from None
    groups = {k.split(".", 1)[0] for k in keys}
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(
            f"{name}: {path.name} is not an adapter saved by this project (its metadata has no "
            f"format={ADAPTER_FORMAT!r}; {len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3]) or 'none'}). Expected "
            f"the {ADAPTER_FILE} that notebook 03 writes (helpers.model.adapter_file.save_adapter). An official "
            "IP-Adapter Plus file is passed as ip_adapter=..., not adapter=...")
    if not {"image_proj", "ip_adapter"} <= groups:
        raise AdapterFileError(f"{name}: {path.name} says format={ADAPTER_FORMAT!r} but holds no image_proj.* and "
                               f"ip_adapter.* tensors (found {sorted(groups)}): the file is damaged; save it again")
    return meta


def resolve_adapter(spec) -> Path:
    """The adapter file named by `spec`, downloaded if it is a Hub id.

    spec: a local file (returned as is: the loaders' key checks name any problem in it); a local folder
          holding adapter.safetensors; or a Hub id 'user/name' ('user/name/sub/file.safetensors' for another
          file), fetched with huggingface_hub's `hf_hub_download` (offline it reads the Hub cache). Folders and
          Hub files must have been written by save_adapter (check_saved_adapter).
    Raises AdapterFileError naming `spec` and what to do.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        file = path / ADAPTER_FILE
        if not file.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise AdapterFileError(f"{path}: no {ADAPTER_FILE} in this folder (it holds {found}); pass notebook 03's "
                                   "run folder (runs/<variant>/), an upload folder, or the adapter file itself")
        check_saved_adapter(file, str(path))
        return file
    hub = split_hub_name(spec)
    filename = None if hub is None else ADAPTER_FILE if not hub[1] else hub[1] if hub[1].endswith(".safetensors") else None
    if filename is None:
        raise AdapterFileError(f"{spec}: no such file or folder (nor a Hub repo id 'user/name')")
    local = _download_adapter(spec, hub[0], filename)
    check_saved_adapter(local, f"Hub repo {hub[0]}")
    return local


def _download_adapter(spec, repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError:
        raise AdapterFileError(
            f"{spec}: not a local file or folder, and the Hub repo {repo!r} is not in the local cache with {filename} "
            "while offline (HF_HUB_OFFLINE is set, or the Hub cannot be reached). Check the path, or go online "
            "once to download it") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{spec}: not a local file or folder, and the Hub repo {repo!r} gave no {filename} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the repo id; for a private repo log in first "
            "(helpers.share.hub.ensure_token(), or `hf auth login`)") from None
