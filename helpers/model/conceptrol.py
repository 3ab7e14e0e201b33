"""Conceptrol (He and Yao, 2025, arXiv 2503.06568): IP-Adapter's image attention masked by the prompt's own
attention to the words that name the subject, a training-free baseline.

    use_conceptrol(unet, global_layer=SD15_GLOBAL_LAYER)   swap in ConceptrolAttnProcessor; returns the state
    stock_processors(unet)                                 put diffusers' own processor objects back
    conceptrol(unet, ...)                                  the two as a context manager
    set_concepts(unet, token_indices)                      the concept's token positions, one list per prompt row
    clear_concepts(unet)                                   forget them (a call without its own then raises)
    concept_token_indices(tokenizer, prompt, concept)      those positions, or ConceptNotFound
    recording_masks(unet)                                  keep the masks each layer used, for plotting

In each cross-attention layer, with Q the image queries and K the 77 text keys (per head):

    A    = softmax(Q K^T * scale)                 (B, heads, HW, 77), the text branch's own attention
    a    = mean over heads and concept tokens     (N, HW), conditional rows only
    M    = a / (max over HW of a + 1e-6)          in [0, 1]; the same M for a row's unconditional twin
    out  = text_branch + ip_scale * M * ip_branch

With global masking, M of one layer (SD 1.5: SD15_GLOBAL_LAYER, at 1/32 of the image) is resized (nearest) to
every other layer's grid and used there instead of that layer's own.

Taken from their code (github.com/QY-H00/Conceptrol at commit 5a639814e83c87af1d8730c160ca05c1af4a0aeb,
`ip_adapter/attention_processor.py`, `ConceptrolAttnProcessor.__call__`, unless named otherwise), and what we
chose:
- The mask averages the text branch's post-softmax probabilities (over all 77 keys) of the concept's tokens,
  over the tokens, then the heads, and divides by its maximum over the image positions plus 1e-6.
- The conditional row's mask serves both halves of the guided batch (their `ip_attention_mask[1:2]`, written
  for one prompt: row 1 of [negative, positive]). Ours: row N + i's mask for rows i and N + i.
- Global masking, as their SD demo runs it (`global_masking=True`, `demo_sd.ipynb`), from their
  `SD_CONCEPT_LAYER` (`ip_adapter/ip_adapter.py`), resized by `F.interpolate(mode="nearest")`. The mask is
  kept from that layer's last call: layers before it in the forward (down and mid blocks) use the previous
  UNet evaluation's, their own at a run's first; it and the layers after it use the current one. Their
  pipeline clears it at each call (`StableDiffusionCustomPipeline.__call__`, `custom_pipelines.py`); the
  stock pipeline has no such moment, so a UNet forward pre-hook clears it when the timestep goes up (a new
  run), and set_concepts does too.
- The chosen layer keeps its mask at IP scale 0 too (their processor never skips; their warm-up,
  `control_guidance_start`, zeroes the scale for the first steps: a pipeline setting, not ours).
- Concept tokens: the first occurrence in the prompt's tokens, + 1 for the start token
  (`ConceptrolIPAdapter.load_textual_concept`). They look up the first and last token separately; we
  require all of them in a row, so "mor" is not found in "morty" and a repeated word gives no backwards span.
Ours alone: the text branch stays diffusers' fused SDPA, and the mask's probabilities are computed beside it
in float32 for the conditional rows only (a mask of ones then gives exactly diffusers' output); one mask
serves every IP-Adapter of a layer; with no concepts set it raises (never silently unmasked); grids that are
not square are read from the UNet's input size.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from torch import nn

SD15_GLOBAL_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # their SD_CONCEPT_LAYER
EPS = 1e-6  # their max-normalisation's guard


class ConceptNotFound(ValueError):
    """A concept whose tokens do not occur, in a row, among the prompt's (after truncation to 77)."""

    def __init__(self, prompt: str, concept: str, why: str):
        what = f"concept {concept!r} not found" if concept else "no subject found"
        super().__init__(f"{what} in prompt {prompt!r}: {why}")
        self.prompt, self.concept = prompt, concept


@dataclass(eq=False)
class ConceptrolState:
    """What the Conceptrol processors of one UNet share."""

    global_layer: str | None
    originals: dict[str, IPAdapterAttnProcessor2_0]  # layer name -> diffusers' processor object
    concepts: list[list[int]] | None = None  # token positions per conditional row; None: not set (raise)
    guided: bool = True  # the batch is [unconditional half, conditional half] (classifier-free guidance)
    global_mask: torch.Tensor | None = None  # (N, HW) float32, the global layer's mask from its last call
    latent_hw: tuple[int, int] | None = None  # the UNet input's (h, w), from the pre-hook
    last_timestep: float | None = None
    record: dict[str, list[torch.Tensor]] | None = None  # {layer: [(N, h, w) per UNet call]} (recording_masks)
    hook: object = field(default=None, repr=False)

    def on_unet_call(self, unet, args, kwargs):
        """UNet forward pre-hook: a timestep above the last one starts a new run, which clears the kept mask."""
        sample = args[0] if args else kwargs["sample"]
        t = float(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])
        if self.last_timestep is None or t > self.last_timestep:
            self.global_mask = None
        self.last_timestep, self.latent_hw = t, tuple(sample.shape[-2:])


def concept_mask(query: torch.Tensor, key: torch.Tensor, concepts: list[list[int]], *, scale: float,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The textual concept mask of N conditional rows: (N, heads, HW, d) queries, (N, heads, L, d) text keys
    -> (N, HW) float32, max-normalised over HW. attention_mask: additive, broadcast to (N, heads, HW, L)."""
    scores = query.float() @ key.float().transpose(-1, -2) * scale  # (N, h, HW, L)
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = scores.softmax(dim=-1)  # (N, h, HW, L)
    weights = torch.zeros(len(concepts), key.shape[2], device=key.device)  # (N, L): the token average
    for row, idx in enumerate(concepts):
        weights[row, idx] = 1.0 / len(idx)
    a = (probs @ weights[:, None, :, None]).mean(dim=1)[..., 0]  # (N, HW): over tokens, then heads
    return a / (a.amax(dim=1, keepdim=True) + EPS)


def token_grid(hw: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a layer's HW image positions: the UNet input's grid halved (rounding up, as a stride-2
    conv does) until it fits, or a square."""
    if latent_hw is not None:
        h, w = latent_hw
        while h * w > hw:
            h, w = -(-h // 2), -(-w // 2)
        if h * w == hw:
            return h, w
    side = math.isqrt(hw)
    if side * side != hw:
        raise ValueError(f"cannot tell the grid of {hw} image positions: not square, and no UNet input size seen")
    return side, side


def resize_mask(mask: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(N, h*w) on grid src -> (N, h'*w') on grid dst, nearest neighbour (their F.interpolate)."""
    return F.interpolate(mask.view(-1, 1, *src), size=dst, mode="nearest").flatten(1)


def _is_zero(scale) -> bool:
    return all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0


class ConceptrolAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IPAdapterAttnProcessor2_0 with each IP-Adapter branch multiplied by the concept mask.

    Built around a stock processor, whose `to_k_ip`/`to_v_ip` modules (the same Parameters) and `scale` list
    (the same list, so `set_ip_adapter_scale` reaches both) it takes over: nothing is allocated or copied.
    name: the attention layer's name in the UNet (the global layer keeps its mask in `state`).
    """

    def __init__(self, stock: IPAdapterAttnProcessor2_0, name: str, state: ConceptrolState):
        nn.Module.__init__(self)  # not IPAdapterAttnProcessor2_0.__init__: it would make new weights
        self.hidden_size, self.cross_attention_dim = stock.hidden_size, stock.cross_attention_dim
        self.num_tokens, self.scale = stock.num_tokens, stock.scale
        self.to_k_ip, self.to_v_ip = stock.to_k_ip, stock.to_v_ip
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        if ip_adapter_masks is not None:
            raise ValueError("Conceptrol makes its own IP masks: do not pass ip_adapter_masks as well")
        if not isinstance(encoder_hidden_states, tuple):
            raise TypeError("Conceptrol needs (text states, image tokens), as the UNet passes with an IP-Adapter")
        text, ip_hidden_states = encoder_hidden_states  # (B, 77, C), list of (B, [M,] 16, C)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, HW, C)
        batch_size, sequence_length, _ = text.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = self._attend(attn, hidden_states, text, ip_hidden_states, attention_mask)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear proj, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, hidden_states, text, ip_hidden_states, attention_mask):
        """Text branch + masked IP branches: (B, HW, C) image states -> (B, HW, heads * d), before to_out."""
        batch_size, heads = text.shape[0], attn.heads
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key, value = attn.to_k(text), attn.to_v(text)  # (B, 77, heads * d)
        head_dim = key.shape[-1] // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, HW, d)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, 77, d)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)  # (B, HW, h * d)
        branches = list(zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip))  # one per IP-Adapter
        needed = self.name == self.state.global_layer or not all(_is_zero(s) for _, s, _, _ in branches)
        mask = self._layer_mask(query, key, attention_mask, attn.scale) if needed else None  # (B, HW, 1)
        for ip_states, ip_scale, to_k_ip, to_v_ip in branches:
            if _is_zero(ip_scale):
                continue
            ip_key = to_k_ip(ip_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, 16, d)
            ip_value = to_v_ip(ip_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0,
                                                    is_causal=False)
            ip_out = ip_out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
            out = out + ip_scale * (ip_out * mask)
        return out

    def _layer_mask(self, query, key, attention_mask, scale) -> torch.Tensor:
        """This layer's mask for the whole batch, (B, HW, 1) in the query's dtype: its own, or the global
        layer's resized; rows N + i (conditional) and i (their unconditional twins) share one."""
        state = self.state
        if state.concepts is None:
            raise RuntimeError("Conceptrol is on but no concepts are set: call set_concepts(unet, token_indices) "
                               "with the concept's token positions for each prompt (concept_token_indices)")
        b, n, hw, length = query.shape[0], len(state.concepts), query.shape[2], key.shape[2]
        if b != n * (1 + state.guided):
            raise ValueError(f"set_concepts gave {n} index lists (guided={state.guided}), but this batch has {b} "
                             "rows: give one list per prompt row (prompts x images per prompt), the unconditional "
                             "half excluded")
        if max(max(idx) for idx in state.concepts) >= length:
            raise ValueError(f"concept token positions {state.concepts} reach past the {length} text tokens")
        grid = token_grid(hw, state.latent_hw)
        if state.global_layer not in (None, self.name) and state.global_mask is not None:
            src = token_grid(state.global_mask.shape[1], state.latent_hw)
            mask = resize_mask(state.global_mask, src, grid)  # (N, HW)
        else:
            cond = slice(b - n, b)  # the conditional half (or the whole unguided batch)
            mask = concept_mask(query[cond], key[cond], state.concepts, scale=scale,
                                attention_mask=None if attention_mask is None else attention_mask[cond])
            if self.name == state.global_layer:
                state.global_mask = mask.detach()
        if state.record is not None:
            state.record.setdefault(self.name, []).append(mask.detach().float().cpu().view(n, *grid))
        mask = mask.repeat(b // n, 1)  # (B, HW): [unconditional twins, conditional] or the unguided rows
        return mask[..., None].to(query.dtype)


def conceptrol_state(unet, *, required: bool = False) -> ConceptrolState | None:
    """The shared state of a UNet's Conceptrol processors; None (or, if required, an error) when it is off."""
    state = next((p.state for p in unet.attn_processors.values() if isinstance(p, ConceptrolAttnProcessor)), None)
    if state is None and required:
        raise RuntimeError("Conceptrol is off: call use_conceptrol(unet) first")
    return state


def use_conceptrol(unet, *, global_layer: str | None = SD15_GLOBAL_LAYER) -> ConceptrolState:
    """Put a ConceptrolAttnProcessor in every IP-Adapter layer of `unet` (diffusers' IPAdapterAttnProcessor2_0;
    others are left alone). global_layer: the layer whose mask every layer uses (a layer name, with or without
    `.processor`), or None for each layer's own mask. Call set_concepts before the pipeline."""
    stock_processors(unet)
    ip = {n.removesuffix(".processor"): p for n, p in unet.attn_processors.items()
          if isinstance(p, IPAdapterAttnProcessor2_0)}
    if not ip:
        raise ValueError("this UNet has no IPAdapterAttnProcessor2_0: load an IP-Adapter first")
    global_layer = None if global_layer is None else global_layer.removesuffix(".processor")
    if global_layer is not None and global_layer not in ip:
        raise ValueError(f"global_layer {global_layer!r} is not an IP-Adapter layer of this UNet; these are: "
                         f"{list(ip)}")
    state = ConceptrolState(global_layer, ip)
    for name, stock in ip.items():
        unet.get_submodule(name).set_processor(ConceptrolAttnProcessor(stock, name, state))
    state.hook = unet.register_forward_pre_hook(state.on_unet_call, with_kwargs=True)
    return state


def stock_processors(unet) -> None:
    """Put back the processor objects use_conceptrol replaced (the very objects), and remove its hook.
    Nothing happens when Conceptrol is off."""
    state = conceptrol_state(unet)
    if state is None:
        return
    for name, stock in state.originals.items():
        unet.get_submodule(name).set_processor(stock)
    state.hook.remove()


@contextlib.contextmanager
def conceptrol(unet, token_indices=None, *, global_layer: str | None = SD15_GLOBAL_LAYER):
    """Conceptrol on (with token_indices set, when given) inside the block, stock processors after. Yields the state."""
    state = use_conceptrol(unet, global_layer=global_layer)
    try:
        if token_indices is not None:
            set_concepts(unet, token_indices)
        yield state
    finally:
        stock_processors(unet)


def set_concepts(unet, token_indices, *, guided: bool = True) -> None:
    """The concept's token positions (concept_token_indices) for each row of the conditional half, in the
    pipeline's order (each prompt repeated num_images_per_prompt times); a single list means one row.
    guided: the pipeline runs classifier-free guidance (guidance_scale > 1), so batches hold twice as many
    rows. Clears the kept global mask, so the next call starts afresh."""
    state = conceptrol_state(unet, required=True)
    rows = list(token_indices)
    if rows and all(isinstance(i, numbers.Integral) for i in rows):  # a single list of positions
        rows = [rows]
    rows = [sorted({int(i) for i in r}) for r in rows]
    if not rows or any(not r or r[0] < 1 for r in rows):
        raise ValueError(f"token_indices {token_indices!r}: give one non-empty list of positions >= 1 per prompt row "
                         "(position 0 is the start token)")
    state.concepts, state.guided, state.global_mask, state.last_timestep = rows, guided, None, None


def clear_concepts(unet) -> None:
    """Forget the concepts set_concepts gave, so that a later call without its own raises instead of masking by
    another prompt's positions. Nothing happens when Conceptrol is off."""
    state = conceptrol_state(unet)
    if state is not None:
        state.concepts, state.global_mask, state.last_timestep = None, None, None


@contextlib.contextmanager
def recording_masks(unet):
    """Keep the mask every layer used: yields {layer name: [(N, h, w) float32 CPU, one per UNet evaluation]};
    the global layer's own is under state.global_layer (SD15_GLOBAL_LAYER)."""
    state = conceptrol_state(unet, required=True)
    state.record = {}
    try:
        yield state.record
    finally:
        state.record = None


def concept_token_indices(tokenizer, prompt: str, concept: str) -> list[int]:
    """Positions of the concept's tokens in the prompt as the text encoder reads it (start token at 0,
    truncated to the tokenizer's 77): the first place where all of them occur in a row. CLIP's BPE splits
    some words into several tokens ("shiba inu" -> shi, ba, in, u); a word's piece is not the word."""
    words = tokenizer(concept, add_special_tokens=False).input_ids
    if not words:
        raise ConceptNotFound(prompt, concept, "the concept has no tokens")

    def find(ids):
        return next((list(range(i, i + len(words))) for i in range(len(ids) - len(words) + 1)
                     if ids[i:i + len(words)] == words), None)

    found = find(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)
    if found is not None:
        return found
    if find(tokenizer(prompt).input_ids) is not None:
        raise ConceptNotFound(prompt, concept, f"it does not fit in the first {tokenizer.model_max_length} tokens, all "
                              "the text encoder reads")
    raise ConceptNotFound(prompt, concept, f"its tokens {tokenizer.convert_ids_to_tokens(words)} do not occur in a row "
                          f"among the prompt's {tokenizer.tokenize(prompt)}")
