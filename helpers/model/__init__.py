"""Notebook 02: IP-Adapter Plus and the text-aware image tokens.

    block.py            the idea: image tokens attend to the prompt (TextImageCrossAttention), hooked into the UNet
    official_format.py  the official IP-Adapter Plus layout <-> diffusers' modules
    adapter_file.py     this project's adapter file: save, read, check against a model, find by name
    pipeline.py         load_pipeline / load_unet: Stable Diffusion 1.5 with the adapter, vanilla or text-aware
    conceptrol.py       Conceptrol, the baseline: IP attention masked by the prompt's attention to the subject's words
    sd15.py             Stable Diffusion 1.5 + IP-Adapter Plus as numbers (the published configs), the sampler
    diagram.py          the architecture drawn, and its parameters per part
"""


def __getattr__(name):  # the entry points, imported on first use so that `helpers.model.block` stays light
    if name == "save_adapter":
        from .adapter_file import save_adapter

        return save_adapter
    if name in ("load_pipeline", "load_unet"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
