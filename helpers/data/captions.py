"""Captions for images that have none: a BLIP captioning model, a callable of yours, or a placeholder.

    texts, caption_source = caption(images, captioner)   # captioner: BLIP model id, callable, or None
    counts, limit = token_counts(texts, base_model)       # tokens per caption, and the text encoder's 77
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ..support.device import default_device_dtype
from ..support.loading import loading

PLACEHOLDER_CAPTION = "a drawing (placeholder caption: no captioner in this profile)"


def blip_captions(images: Sequence[Image.Image], model_id: str, *, batch_size: int = 16, device=None,
                  max_new_tokens: int = 40, progress: bool = True, beat: Callable[[], None] | None = None) -> list[str]:
    """Caption images with a BLIP captioning model (e.g. Salesforce/blip-image-captioning-base), fp16 on a
    GPU, batched, with a progress bar. Returns one caption per image. `beat` is called after each batch (the
    folder lock's heartbeat of the preparation that asked)."""
    from tqdm.auto import tqdm
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device, dtype = default_device_dtype(device)
    with loading("captioning model (BLIP)", model_id):
        processor = BlipProcessor.from_pretrained(model_id)
        model = BlipForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    out: list[str] = []
    with torch.no_grad(), tqdm(total=len(images), desc="captioning (BLIP)", unit="img", disable=not progress) as bar:
        for s in range(0, len(images), batch_size):
            batch = list(images[s:s + batch_size])
            pixels = processor(images=batch, return_tensors="pt").pixel_values.to(device, dtype)
            ids = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens)
            out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
            bar.update(len(batch))
            if beat is not None:
                beat()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def caption(images, captioner, progress, beat: Callable[[], None] | None = None) -> tuple[list[str], str]:
    """(captions, caption_source) for images that have none (`beat`: see blip_captions)."""
    if captioner is None:
        return [PLACEHOLDER_CAPTION] * len(images), "placeholder"
    if callable(captioner):
        return list(captioner(images)), getattr(captioner, "caption_source", "captioner")
    return blip_captions(images, str(captioner), progress=progress, beat=beat), "blip"


def token_counts(texts: Sequence[str], base_model) -> tuple[list[int], int]:
    """Tokens per text with the base model's own tokenizer (its `tokenizer/` subfolder; start and end tokens
    included, nothing cut), and how many positions its text encoder reads (77 for SD 1.5). A caption with
    more tokens than that is truncated: its end never reaches the model."""
    from huggingface_hub import hf_hub_download
    from transformers import CLIPTokenizer

    # the class the pipeline itself loads (model_index.json); AutoTokenizer would also look for a
    # tokenizer/config.json that SD 1.5 does not ship, which fails offline
    with loading("base model's tokenizer", base_model):
        if not Path(str(base_model)).is_dir():  # CLIPTokenizer returns an empty tokenizer for a missing repo
            hf_hub_download(str(base_model), "vocab.json", subfolder="tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(str(base_model), subfolder="tokenizer")
    if len(tokenizer) < 3:  # transformers can return an empty tokenizer instead of failing
        raise OSError(f"{base_model}: its tokenizer/ subfolder holds no vocabulary ({len(tokenizer)} tokens)")
    ids = tokenizer(list(texts), truncation=False, verbose=False).input_ids
    return [len(i) for i in ids], int(tokenizer.model_max_length)
