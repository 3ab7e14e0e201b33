"""Test support: tiny-pipeline runs, a text-aware block that is not the identity, and fine-tuned-looking
adapter files as notebook 03 writes them, without training."""
from pathlib import Path

import torch

from helpers.model.adapter_file import ADAPTER_FILE, save_adapter
from helpers.model.official_format import adapter_parameters
from helpers.model.pipeline import load_pipeline
from helpers.sample.registry import FINETUNED
from helpers.tiny.assets import RESOLUTION

PROMPT = "a cartoon drawing of a boy with blue hair"


def run(pipe, image, prompt=PROMPT, seed=0, **kw):
    kw = {"num_inference_steps": 2, "height": RESOLUTION, "width": RESOLUTION, **kw}
    return pipe(prompt, ip_adapter_image=image, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def make_text_aware_nonzero(pipe, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.text_image_attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def write_finetuned_adapters(profile, runs_dir, *, seed: int = 0) -> dict[str, Path]:
    """runs_dir/<folder>/adapter.safetensors for every model of helpers.sample.bank.FINETUNED: the profile's
    IP-Adapter with every adapter weight perturbed (and, for text-aware, a block that is not the identity),
    saved with helpers.model.pipeline.save_adapter. Returns model name -> file."""
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for name, (folder, variant) in FINETUNED.items():
        pipe = load_pipeline(profile.base_model, profile.ip_adapter, variant=variant, device="cpu")
        params = list(adapter_parameters(pipe.unet).values())  # with the text-image block when text-aware
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        paths[name] = save_adapter(pipe, Path(runs_dir) / folder / ADAPTER_FILE, metadata={"test": True})
    return paths
