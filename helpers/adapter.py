"""IP-Adapter Plus in diffusers, vanilla and text-aware, and its single-file format.

Vanilla is diffusers' own IP-Adapter path, untouched: `pipe.load_ip_adapter` puts the Plus Resampler in
`unet.encoder_hid_proj` and an `IPAdapterAttnProcessor2_0` in each of the 16 cross-attention layers,
which adds `scale * Attention(Q, to_k_ip(ip_tokens), to_v_ip(ip_tokens))` to the text cross-attention.

Text-aware adds one block before that: the 16 image tokens attend to the prompt's 77 text states
(`TextImageCrossAttention`), so the prompt can decide what of the reference reaches the UNet. It is
hooked in `TextAwareUNet2DConditionModel.process_encoder_hidden_states`, the one place where diffusers
holds both the text states and the image tokens (see that class for why there).

File format (`save_adapter` / `load_pipeline(adapter=...)`): one .safetensors file with the official
IP-Adapter keys (`image_proj.*` for the Resampler, `ip_adapter.{k}.to_{k,v}_ip.weight`, k = 1, 3, ...,
31 for SD 1.5), plus `text_image_attn.*` for the text-aware variant, plus string metadata. A vanilla
file loads in plain diffusers: `pipe.load_ip_adapter(folder, subfolder="", weight_name=file)`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.utils import deprecation_utils as _deprecation_utils
from torch import nn

VARIANTS = ("vanilla", "text_aware")
# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warns on the old name); Colab's may be older.
_DTYPE_KW = "dtype" if hasattr(_deprecation_utils, "_resolve_dtype") else "torch_dtype"
BLOCK_PREFIX = "text_image_attn."


class AdapterFileError(ValueError):
    """An adapter file that cannot be used as asked; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------------
# The new block
# --------------------------------------------------------------------------------------------------


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
        """Register a fresh block (identity at start). Its q/k/v initialisation is seeded, so the same
        pretrained adapter always gives the same text-aware starting point; the global RNG is untouched."""
        dim = self.config.cross_attention_dim
        param = next(self.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            block = TextImageCrossAttention(dim, dim, heads)
        self.text_image_attn = block.to(device=param.device, dtype=param.dtype)
        return self.text_image_attn

    def process_encoder_hidden_states(self, encoder_hidden_states, added_cond_kwargs):
        out = super().process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        block = self._modules.get("text_image_attn")
        if block is None or not isinstance(out, tuple):
            return out
        text, ip_tokens = out  # (B, 77, C), list of (B, [M,] 16, D), one per adapter
        return text, [block(tokens, text) for tokens in ip_tokens]


# --------------------------------------------------------------------------------------------------
# The official file format <-> diffusers modules
# --------------------------------------------------------------------------------------------------


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


def _resampler_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' IPAdapterPlusImageProjection state dict -> tencent-ailab Resampler keys (the inverse of
    diffusers' `_convert_ip_adapter_image_proj_to_diffusers`)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "layers":  # latents, proj_in, proj_out, norm_out
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("ln0."):
            out[f"layers.{i}.0.norm1.{rest[4:]}"] = value
        elif rest.startswith("ln1."):
            out[f"layers.{i}.0.norm2.{rest[4:]}"] = value
        elif rest == "attn.to_q.weight":
            out[f"layers.{i}.0.to_q.weight"] = value
        elif rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, sd[f"layers.{i}.attn.to_v.weight"]], dim=0)
        elif rest == "attn.to_v.weight":
            continue  # stored with to_k as to_kv
        elif rest == "attn.to_out.0.weight":
            out[f"layers.{i}.0.to_out.weight"] = value
        elif rest.startswith("ff.0."):
            out[f"layers.{i}.1.0.{rest[5:]}"] = value
        elif rest == "ff.1.net.0.proj.weight":
            out[f"layers.{i}.1.1.weight"] = value
        elif rest == "ff.1.net.2.weight":
            out[f"layers.{i}.1.3.weight"] = value
        else:
            raise KeyError(f"unexpected Resampler key {key!r}")
    return out


def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights of a UNet with an IP-Adapter Plus loaded, in the official flat format
    (+ `text_image_attn.*` when the UNet is text-aware), as detached CPU tensors."""
    if getattr(unet, "encoder_hid_proj", None) is None or unet.config.encoder_hid_dim_type != "ip_image_proj":
        raise ValueError("this UNet has no IP-Adapter loaded (load one with load_pipeline first)")
    layers = unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1:
        raise ValueError(f"expected one IP-Adapter, found {len(layers)}")
    sd = {f"image_proj.{k}": v for k, v in _resampler_to_official(layers[0].state_dict()).items()}
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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _split_hub_path(spec: str, min_parts: int) -> tuple[str, str, str]:
    """'owner/repo/sub/folder/name' -> ('owner/repo', 'sub/folder', 'name')."""
    parts = spec.strip("/").split("/")
    if len(parts) < min_parts:
        raise ValueError(f"{spec!r} is neither an existing local path nor 'hub_owner/repo/subfolder/file'")
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


def resolve_ip_adapter(ip_adapter: str | os.PathLike) -> tuple[Path, str | tuple[str, str]]:
    """Local path of an IP-Adapter file, and where its image encoder lies by default (a local folder,
    or (hub repo, subfolder)). Accepts a local file or 'hub_id/subfolder/weight_name'."""
    p = Path(ip_adapter)
    if p.is_file():
        return p, str(p.parent / "image_encoder")
    from huggingface_hub import hf_hub_download

    repo, sub, name = _split_hub_path(str(ip_adapter), 3)
    local = hf_hub_download(repo, name, subfolder=sub or None)
    return Path(local), (repo, f"{sub}/image_encoder" if sub else "image_encoder")


def _load_image_encoder(spec, dtype):
    from transformers import CLIPVisionModelWithProjection

    if isinstance(spec, tuple):
        repo, sub = spec
    elif Path(spec).is_dir():
        repo, sub = str(spec), None
    else:
        repo, sub, name = _split_hub_path(str(spec), 3)
        sub = f"{sub}/{name}" if sub else name
    try:
        return CLIPVisionModelWithProjection.from_pretrained(repo, subfolder=sub or "", dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(f"image encoder {spec}: could not load a CLIPVisionModelWithProjection ({e})") from None


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """cuda + fp16 when a GPU is present (a T4 has no native bf16), else cpu + fp32."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_pipeline(base_model, ip_adapter, *, variant="vanilla", adapter=None, image_encoder=None, device=None,
                  dtype=None, vae=None):
    """A diffusers StableDiffusionPipeline with IP-Adapter Plus loaded, vanilla or text-aware.

    base_model:    Hub id or local folder of a StableDiffusionPipeline
    ip_adapter:    an official-format IP-Adapter Plus file (local path) or "hub_id/subfolder/weight_name"
    variant:       "vanilla" (diffusers' own path) or "text_aware" (plus the text-image block)
    adapter:       fine-tuned weights written by save_adapter, replacing ip_adapter's: a file, a folder holding
                   adapter.safetensors, or a Hub repo id "user/name" (helpers.hub.resolve_adapter)
    image_encoder: Hub id/subfolder or local folder; None = the image_encoder folder next to ip_adapter
    device, dtype: default cuda + fp16 with a GPU, else cpu + fp32
    vae:           None = base_model's; else a Hub id or folder of an AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse)

    `pipe(prompt, ip_adapter_image=...)` and `pipe.set_ip_adapter_scale(...)` work as in diffusers. The
    safety checker is not loaded (research on cartoon drawings; it blacks out false positives).
    """
    from diffusers import StableDiffusionPipeline

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    from .hub import load_vae, resolve_adapter

    device, dtype = default_device_dtype(device, dtype)
    ip_path, encoder_default = resolve_ip_adapter(ip_adapter)
    weights_path = resolve_adapter(adapter) if adapter is not None else ip_path
    tensors, meta = read_adapter_file(weights_path)
    encoder = _load_image_encoder(image_encoder if image_encoder is not None else encoder_default, dtype)
    unet = None
    if variant == "text_aware":
        unet = TextAwareUNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **{_DTYPE_KW: dtype})
    kwargs = {"unet": unet} if unet is not None else {}
    if vae is not None:
        kwargs["vae"] = load_vae(vae, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        base_model, safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
        **{_DTYPE_KW: dtype}, **kwargs)
    check_adapter_tensors(tensors, pipe.unet, image_encoder_dim=encoder.config.hidden_size, variant=variant,
                          path=weights_path, as_finetuned=adapter is not None)
    pipe.load_ip_adapter(split_official(tensors), subfolder="", weight_name="", image_encoder_folder=None)
    if variant == "text_aware":
        _attach_block(pipe.unet, tensors, meta)
    pipe.to(device)
    pipe.adapter_info = {"variant": variant, "weights": str(weights_path), **meta}
    return pipe


def _attach_block(unet, tensors, meta) -> TextImageCrossAttention:
    """Add the text-image block (as many heads as the Resampler: 12 for SD 1.5 Plus) with the file's
    weights, or zero-initialised when the file has none."""
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    block = unet.add_text_image_attn(int(meta.get("text_image_attn_heads", resampler.layers[0].attn.heads)))
    block_sd = {k[len(BLOCK_PREFIX):]: v for k, v in tensors.items() if k.startswith(BLOCK_PREFIX)}
    if block_sd:
        block.load_state_dict(block_sd, strict=True)
    return block


def load_unet(base_model, ip_adapter, *, variant="vanilla", adapter=None, image_encoder_dim: int, device=None,
              dtype=None):
    """The UNet alone with the adapter attached: what training from cached features needs (no VAE, no
    text or image encoder in memory). Same modules and weights as `load_pipeline(...).unet` (tested);
    the adapter is attached by diffusers' `_load_ip_adapter_weights`, the call `pipe.load_ip_adapter` makes.
    image_encoder_dim: width of the image features the Resampler reads (1280 for ViT-H/14)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    from .hub import resolve_adapter

    device, dtype = default_device_dtype(device, dtype)
    weights_path = resolve_adapter(adapter) if adapter is not None else resolve_ip_adapter(ip_adapter)[0]
    tensors, meta = read_adapter_file(weights_path)
    cls = TextAwareUNet2DConditionModel if variant == "text_aware" else UNet2DConditionModel
    unet = cls.from_pretrained(base_model, subfolder="unet", **{_DTYPE_KW: dtype})
    check_adapter_tensors(tensors, unet, image_encoder_dim=image_encoder_dim, variant=variant, path=weights_path,
                          as_finetuned=adapter is not None)
    unet._load_ip_adapter_weights([split_official(tensors)], low_cpu_mem_usage=False)
    if variant == "text_aware":
        _attach_block(unet, tensors, meta)
    unet.adapter_info = {"variant": variant, "weights": str(weights_path), **meta}
    return unet.to(device=device, dtype=dtype)


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
