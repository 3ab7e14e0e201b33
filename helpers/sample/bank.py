"""The models of the registry (helpers.sample.registry) over one shared pipeline: notebooks 04 and 05.

    bank = load_models(profile, runs_dir, baselines=True)   # every model whose weights are there
    pipe = bank.use("finetuned-text-aware")                  # the shared pipeline, pointed at that model
    bank.set_ip_scale(0.7)                                   # checked: every IP layer reads back what was set

They share one pipeline: one VAE, text encoder, image encoder and base UNet in memory, a
`TextAwareUNet2DConditionModel` whose text-image block is set to None for the vanilla models (then it is
exactly diffusers' UNet). Only the adapter weights differ between models: the Resampler, the 16
`to_k_ip` / `to_v_ip` pairs and, for a text-aware model, its block. Each model's copy of them stays on the
device, and `ModelBank.use(name)` points the live parameters at that copy (`param.data = tensor`): no copy,
no rounding, so a bank model computes exactly what a standalone `load_pipeline(..., adapter=file)` computes
(tested). A baseline shares its source's tensors. notebook 04 prints what the shared part and each adapter cost.

IP-Adapter scales go through `set_ip_scale`: every IP layer at `scale`, or, for a model with `ip_layers`,
those layers at `scale` and every other at 0 (diffusers' per-block dict, as InstantStyle does), and then
each IPAdapterAttnProcessor's `.scale` is read back to check that exactly those were set: a dict that
diffusers drops without a word (SD 1.5's up_blocks.0 has no attention) cannot turn the adapter off unnoticed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..model.adapter_file import (
    ADAPTER_FILE,
    AdapterFileError,
    adapter_variant,
    check_adapter_tensors,
    read_adapter_file,
    resolve_adapter,
    text_image_block,
)
from ..model.block import TextImageCrossAttention, block_effect
from ..model.conceptrol import (
    SD15_GLOBAL_LAYER,
    conceptrol_state,
    stock_processors,
    use_conceptrol,
)
from ..model.official_format import adapter_parameters, official_to_live
from ..model.pipeline import load_pipeline, resolve_ip_adapter
from .registry import (
    BASELINES,
    FINETUNED,
    MODEL_NAMES,
    MODELS,
    PRETRAINED,
    ModelSpec,
    adapter_sha256,
    label,
    opt_in_note,
)


@dataclass
class AdapterWeights:
    """One model of the bank: its adapter tensors (on the device) and where they came from."""

    name: str
    variant: str  # "vanilla" or "text_aware"
    source: str  # file the weights were read from
    params: dict[str, torch.Tensor] = field(repr=False)  # adapter_parameters(block=False) name -> tensor
    block: TextImageCrossAttention | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict)
    ip_layers: tuple[str, ...] | None = None  # see ModelSpec
    attention: str | None = None  # see ModelSpec: "conceptrol", or None for diffusers' own processors
    sha256: str = ""  # the identity of `source` (helpers.sample.registry.adapter_sha256), computed when loaded


class ModelBank:
    """Several IP-Adapter models over one shared pipeline. Build it with `load_models`.

    names:   the available models, in MODEL_NAMES order
    missing: model name -> why it is not available (a message naming the file and what to do), every one
    opt_in_untrained: the names of `missing` that are opt-in models notebook 03 has not trained (registry
             ModelSpec.opt_in) and that nobody asked for by name: the notes give them one line together
    pipe:    the shared diffusers StableDiffusionPipeline; `use(name)` puts a model's adapter in it
    """

    def __init__(self, pipe, profile, models: dict[str, AdapterWeights], missing: dict[str, str],
                 opt_in_untrained=()):
        self.pipe = pipe
        self.profile = profile
        self.models = models
        self.missing = missing
        self.opt_in_untrained = [n for n in opt_in_untrained if n in missing]
        self.active: str | None = None
        self._live = adapter_parameters(pipe.unet, block=False)
        self.conceptrol_layer = SD15_GLOBAL_LAYER  # Conceptrol's global mask: their SD 1.5 layer (same name in tiny)
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # image digest -> (negative, positive)

    @property
    def names(self) -> list[str]:
        return [n for n in MODEL_NAMES if n in self.models] + [n for n in self.models if n not in MODEL_NAMES]

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def adapter_sha256(self, name: str) -> str:
        """The identity of model `name`'s weights: the shortened sha256 of the file they were read from when the
        bank was loaded (helpers.sample.registry.adapter_sha256); a baseline has its source's."""
        return self.models[name].sha256

    def describe(self) -> str:
        """Which models are available and which are not, with the reason (missing_notes: the untrained opt-in
        models in one line)."""
        lines = []
        for n in self.names:
            m = self.models[n]
            spec = MODELS.get(n)
            how = (", text-image block removed" if spec is not None and not spec.block else "") + (
                f", IP-Adapter only in {', '.join(m.ip_layers)}" if m.ip_layers else "") + (
                f", IP attention masked by the prompt's subject (global mask of {self.conceptrol_layer})"
                if m.attention == "conceptrol" else "")
            lines.append(f"{n} ({label(n)}): {m.variant}, {m.source} (sha256 {m.sha256}){how}")
        return "\n".join(lines + self.missing_notes("{name}: NOT AVAILABLE - {why}"))

    def missing_notes(self, form: str = "{name} is not available: {why}") -> list[str]:
        """What is missing, in lines: one per model of `missing` (`form` with its name and why), but one line for
        all the untrained opt-in models together, naming each and the notebook 03 setting that trains it."""
        lines = [form.format(name=n, why=why) for n, why in self.missing.items() if n not in self.opt_in_untrained]
        return lines + ([opt_in_note(self.opt_in_untrained)] if self.opt_in_untrained else [])

    def use(self, name: str):
        """Point the pipeline at model `name`'s adapter weights (exact: the tensors themselves, no copy).
        Returns the pipeline."""
        if name not in self.models:
            why = self.missing.get(name, f"not one of the bank's models ({', '.join(self.names)})")
            raise KeyError(f"model {name!r} is not available: {why}")
        if self.active != name:
            model = self.models[name]
            for key, param in self._live.items():
                param.data = model.params[key]
            self.pipe.unet.text_image_attn = model.block  # None: exactly the vanilla UNet
            # Conceptrol's processors hold the same to_k_ip / to_v_ip modules, so the swap above reaches them
            if model.attention == "conceptrol" and conceptrol_state(self.pipe.unet) is None:
                use_conceptrol(self.pipe.unet, global_layer=self.conceptrol_layer)
            elif model.attention is None:
                stock_processors(self.pipe.unet)  # diffusers' own processor objects, exactly
            self.active = name
        return self.pipe

    def to(self, device) -> "ModelBank":
        """Move the pipeline and every model's weights to `device`, e.g. "cpu" to leave the GPU to other processes
        (notebook 05's launch) and back. The active model stays active. Returns the bank."""
        active = self.active
        self.pipe.to(device)
        for model in self.models.values():
            model.params = {k: v.to(device) for k, v in model.params.items()}
            if model.block is not None:
                model.block.to(device)
        self._features.clear()  # image features on the old device
        self.active = None
        if active is not None:
            self.use(active)  # the pipeline's adapter parameters point at the moved tensors again
        return self

    @property
    def uses_concepts(self) -> bool:
        """Whether the active model masks its IP attention by the prompt's subject (Conceptrol): then every
        pipeline call needs set_concepts first (helpers.sample.generate does it)."""
        return self.active is not None and self.models[self.active].attention == "conceptrol"

    def set_ip_scale(self, scale: float) -> dict[str, float]:
        """Set the active model's IP-Adapter scale: every IP layer at `scale`, or only its `ip_layers`
        (others 0). Returns {attention processor name: scale} as read back from the processors."""
        layers = self.models[self.active].ip_layers if self.active is not None else None
        return set_ip_scale(self.pipe, scale, layers)

    def block_effect(self, references: dict[str, Image.Image], prompts, name: str = "finetuned-text-aware") -> list[dict]:
        """How much model `name`'s text-image block changes the image tokens (helpers.model.block.block_effect:
        |update| / |tokens|), for every reference x prompt. prompts: a list for every reference, or
        {reference id: [prompts]}. Returns rows {"reference", "prompt", "update / tokens"}."""
        if name not in self.models or self.models[name].block is None:
            raise ValueError(f"{name!r} is not a text-aware model of this bank (text-aware: "
                             f"{[n for n, m in self.models.items() if m.block is not None] or 'none'})")
        pipe = self.use(name)
        rows = []
        for ref_id, image in references.items():
            _, pos = self.image_features(image)  # (1, 1, 257, W)
            for prompt in (prompts.get(ref_id, []) if isinstance(prompts, dict) else prompts):
                with torch.no_grad():
                    text = pipe.encode_prompt(prompt, self.device, 1, False)[0]  # (1, 77, C)
                ratio = block_effect(pipe.unet, pos, text)
                rows.append({"reference": ref_id, "prompt": prompt, "update / tokens": float(ratio[0])})
        return rows

    def image_features(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) image-encoder features of a reference, each (1, 1, tokens, width):
        the penultimate hidden states of the reference and of a zero image, from the same
        `pipe.encode_image` call the pipeline makes (257 x 1280 for ViT-H/14). Cached per image content;
        they do not depend on the model, as every model shares the image encoder."""
        image = image.convert("RGB")
        key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        if key not in self._features:
            with torch.no_grad():
                pos, neg = self.pipe.encode_image(image, self.device, 1, output_hidden_states=True)
            if len(self._features) > 256:
                self._features.clear()
            self._features[key] = (neg[None], pos[None])
        return self._features[key]


def ip_scales(unet) -> dict[str, float]:
    """{attention processor name: scale} of every IP-Adapter layer, read from the processors themselves."""
    return {name: float(proc.scale[0]) for name, proc in unet.attn_processors.items() if hasattr(proc, "scale")
            and hasattr(proc, "to_k_ip")}


def _per_block_dict(layers: tuple[str, ...], scale: float) -> dict:
    """("down_blocks.2", "mid_block", "up_blocks.1"), 0.7 -> diffusers' {"down": {"block_2": 0.7},
    "mid": 0.7, "up": {"block_1": 0.7}}."""
    out: dict = {}
    for layer in layers:
        if layer == "mid_block":
            out["mid"] = scale
            continue
        where, _, index = layer.partition("_blocks.")
        if where not in ("down", "up") or not index.isdigit():
            raise ValueError(f"IP layer {layer!r}: name a UNet block as 'down_blocks.<i>', 'mid_block' or 'up_blocks.<i>'")
        out.setdefault(where, {})[f"block_{index}"] = scale
    return out


def set_ip_scale(pipe, scale: float, layers: tuple[str, ...] | None = None) -> dict[str, float]:
    """`pipe.set_ip_adapter_scale` with a check: every IP layer at `scale` (layers None), or only the IP
    layers inside the named UNet blocks at `scale` and every other at 0 (InstantStyle's per-block dict).
    Reads each IPAdapterAttnProcessor's `.scale` back and raises if any differs from what was asked, so a
    dict that diffusers drops without a word (SD 1.5's up_blocks.0 has no attention) cannot turn the
    adapter off unnoticed. Returns {processor name: scale}."""
    scale = float(scale)
    names = list(ip_scales(pipe.unet))
    if layers is None:
        pipe.set_ip_adapter_scale(scale)
        wanted = dict.fromkeys(names, scale)
    else:
        empty = [b for b in layers if not any(n.startswith(b + ".") for n in names)]
        if empty:
            raise ValueError(f"IP layers {empty} hold no IP-Adapter attention in this UNet (SD 1.5's up_blocks.0 "
                             f"has none); blocks that do: {sorted({n.split('.attentions')[0] for n in names})}")
        pipe.set_ip_adapter_scale(_per_block_dict(tuple(layers), scale))
        wanted = {n: scale if any(n.startswith(b + ".") for b in layers) else 0.0 for n in names}
    got = ip_scales(pipe.unet)
    wrong = {n: (got[n], v) for n, v in wanted.items() if got[n] != v}
    if wrong:
        raise RuntimeError(f"set_ip_adapter_scale left {len(wrong)} IP layers at the wrong scale "
                           f"(name: (set, wanted)): {wrong}")
    return got


def _load_finetuned(pipe, name: str, path: Path, variant: str, live: dict[str, torch.nn.Parameter]) -> AdapterWeights:
    """Read and check one save_adapter file; its tensors on the pipeline's device and dtype."""
    tensors, meta = read_adapter_file(path)
    unet = pipe.unet
    check_adapter_tensors(tensors, unet, image_encoder_dim=pipe.image_encoder.config.hidden_size,
                          variant=variant, path=path, as_finetuned=True)
    params = official_to_live(tensors)
    if set(params) != set(live):
        raise AdapterFileError(f"{path}: its adapter tensors do not map onto this pipeline's "
                               f"({len(set(live) - set(params))} missing, {len(set(params) - set(live))} extra)")
    for key, value in params.items():
        if value.shape != live[key].shape:
            raise AdapterFileError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(live[key].shape)}")
    params = {k: v.to(device=unet.device, dtype=unet.dtype) for k, v in params.items()}
    block = text_image_block(tensors, meta, unet).eval().requires_grad_(False) if variant == "text_aware" else None
    return AdapterWeights(name, variant, str(path), params, block, dict(meta), sha256=adapter_sha256(path))


def _baseline_weights(name: str, spec: ModelSpec, models: dict[str, AdapterWeights]) -> AdapterWeights:
    """A baseline or ablation: its source's tensors (shared, not copied), without the block if asked."""
    src = models[spec.source]
    block = src.block if spec.block else None
    return AdapterWeights(name, src.variant if block is not None else "vanilla", src.source, src.params, block,
                          dict(src.metadata), spec.ip_layers, spec.attention, src.sha256)


def load_models(profile, runs_dir=None, *, extra=None, vae=None, device=None, dtype=None, baselines=False,
                verbose: bool = True) -> ModelBank:
    """The pretrained IP-Adapter Plus and notebook 03's fine-tuned adapters over one shared pipeline.

    profile:  a helpers.profile.Profile (base model, IP-Adapter file, image encoder, sampler)
    runs_dir: the folder notebook 03 trained into (its vanilla/ and text_aware/ subfolders hold
              adapter.safetensors); None or missing files: only the pretrained model
    extra:    more models, {name: Hub id "user/name", run folder or adapter file} (helpers.model.adapter_file.resolve_adapter);
              the variant comes from the file
    vae:      None = profile.base_model's VAE; else a Hub id or folder of an AutoencoderKL
    device, dtype: default cuda + fp16 with a GPU, else cpu + fp32
    baselines: also the registry's baselines and ablations (BASELINES) whose source model is available: True
              for all of them, or a list of their names

    A missing or unusable adapter file never raises: the bank records why in `bank.missing` (printed
    once here unless verbose=False, as `bank.missing_notes()`) and offers the models it has (always
    "pretrained"). The opt-in models notebook 03 has not trained (registry ModelSpec.opt_in) share one line
    there, unless profile.eval_models names one: a model asked for by name gets its own line.
    """
    clash = sorted(set(extra or {}) & set(MODEL_NAMES))
    if clash:
        raise ValueError(f"extra model names {clash} are taken by the built-in models; choose other names")
    pipe = load_pipeline(profile.base_model, profile.ip_adapter, variant="text_aware",
                         image_encoder=profile.image_encoder, device=device, dtype=dtype, vae=vae,
                         scheduler=profile.scheduler)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    unet.requires_grad_(False)
    live = adapter_parameters(unet, block=False)
    pretrained = AdapterWeights(PRETRAINED, "vanilla", str(profile.ip_adapter),
                                {k: p.data for k, p in live.items()}, None, {},
                                sha256=adapter_sha256(resolve_ip_adapter(profile.ip_adapter)))
    unet.text_image_attn = None  # the zero-initialised block load_pipeline added: unused
    models, missing, untrained = {PRETRAINED: pretrained}, {}, []
    for name, (folder, variant) in FINETUNED.items():
        if runs_dir is None:
            missing[name] = "no runs folder given (notebook 03 writes one)"
            untrained.append(name)
            continue
        path = Path(runs_dir) / folder / ADAPTER_FILE
        if not path.is_file():
            missing[name] = (f"no adapter at {path}: train it in notebook 03 ({label(name)}, variant {variant!r}), "
                             f"or copy its adapter.safetensors there")
            untrained.append(name)
            continue
        try:
            models[name] = _load_finetuned(pipe, name, path, variant, live)
        except (AdapterFileError, KeyError, OSError, RuntimeError, ValueError) as e:
            missing[name] = f"cannot use {path}: {e}"
    for name in BASELINES if baselines is True else [b for b in BASELINES if b in (baselines or ())]:
        spec = MODELS[name]
        if spec.source in models:
            models[name] = _baseline_weights(name, spec, models)
        else:
            missing[name] = f"it is derived from {spec.source}, which is not available"
    for name, spec in (extra or {}).items():
        try:
            path = resolve_adapter(spec)
            models[name] = _load_finetuned(pipe, name, path, adapter_variant(path), live)
        except (AdapterFileError, KeyError, OSError, RuntimeError, ValueError) as e:
            missing[name] = f"cannot use {spec}: {e}"
    asked = set(getattr(profile, "eval_models", None) or ())  # named in notebook 05's EVAL_MODELS / --models
    bank = ModelBank(pipe, profile, models, missing, [n for n in untrained if MODELS[n].opt_in and n not in asked])
    bank.use(PRETRAINED)
    if verbose and missing:
        print("\n".join(bank.missing_notes()))
        print(f"Models available: {', '.join(bank.names)}")
    return bank
