"""Which models, data and sizes a run uses: the `full` profile (Colab, real weights) or `tiny` (CI, random).

Every Hub id, size, count and path that differs between the two profiles lives here and nowhere else;
the notebooks and `helpers` read them from the `Profile` that `get_profile()` returns.

    full  Stable Diffusion 1.5 + IP-Adapter Plus + the Rick and Morty drawings, 512 px: real results.
    tiny  the same code on small random models and a synthetic cartoon dataset built offline
          (helpers.tiny): every number and picture it gives is meaningless, by design.
    auto  full with a CUDA GPU, tiny without. IPA_PROFILE=full|tiny|auto overrides the default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

PROFILE_ENV = "IPA_PROFILE"
NAMES = ("auto", "full", "tiny")
# The sampler of every notebook: DDIM, as the seed project and the IP-Adapter paper sampled. A diffusers
# scheduler class, built from the base model's own scheduler config (helpers.adapter.make_scheduler).
DEFAULT_SCHEDULER = "DDIMScheduler"


@dataclass(frozen=True)
class Profile:
    name: str  # "full" or "tiny"
    reason: str  # why this profile was chosen (printed in the banner)
    random_weights: bool  # True: outputs are noise with the right shape, label them so
    # models (Hub ids or local folders)
    base_model: str
    ip_adapter: str  # official IP-Adapter Plus file: local path or "hub_id/subfolder/weight_name"
    image_encoder: str | None  # None = the image_encoder folder next to ip_adapter
    eval_clip: str  # CLIP for CLIP-T / CLIP-I
    dino: str  # ViT for DINO similarity
    captioner: str | None  # BLIP for missing captions (None: a deterministic stand-in)
    # data
    dataset: str  # Hub id or local dataset folder
    resolution: int  # pixels
    test_fraction: float = 0.1
    feature_batch_size: int = 16  # images per batch when caching VAE/CLIP features (helpers.data)
    # training (the seed's recipe)
    train_batch_size: int = 4
    num_epochs: int = 6
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    checkpoint_every: int = 200  # steps
    max_train_steps: int | None = None  # None: num_epochs over the training split
    gradient_checkpointing: bool = False  # trade ~30% speed for activation memory (the OOM knob, with batch size)
    # sampling and evaluation
    scheduler: str = DEFAULT_SCHEDULER  # the sampler (a diffusers scheduler class name), set in load_pipeline
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    eval_scales: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    # full: as many of the test split's ~26 groups as 90 min of T4 generation allow at an ESTIMATED 5 s per
    # image, for 6 models x 4 scales x (own caption + 2 edits) = 72 images per reference: 15 references,
    # 1080 images (helpers.evaluation.references_for_budget; the estimate is T4_SECONDS_PER_IMAGE there)
    eval_num_references: int = 15  # held-out references (one per near-duplicate group)
    eval_seeds: tuple[int, ...] = (0,)
    eval_edits_per_reference: int = 2  # edit prompts per reference, besides its own caption
    eval_batch_size: int | None = None  # images per pipeline call in the evaluation; None: sampling's choice

    def replace(self, **overrides) -> "Profile":
        """A copy with the given fields changed. None, and only None, means "keep the profile's value" (a
        notebook form field left at None); every other value is used as given, so 0, False and "" stick:
        guidance_scale=0 turns guidance off, test_fraction=0 keeps no test split."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Profile has no field {', '.join(unknown)}; the fields are "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def sampler(self) -> str:
        """The sampling settings in words, e.g. "DDIM sampler (diffusers DDIMScheduler), 30 steps, guidance 7.5"."""
        short = self.scheduler.removesuffix("Scheduler").removesuffix("Discrete").removesuffix("Multistep")
        return (f"{short} sampler (diffusers {self.scheduler}), {self.num_inference_steps} steps, "
                f"guidance {self.guidance_scale:g}")

    def banner(self) -> str:
        """Which profile and why, what its results mean, and the sampler (printed by get_profile)."""
        if self.random_weights:
            return (f"Profile: {self.name} ({self.reason}). Small RANDOM-weight models and synthetic data: "
                    "pictures and scores below are meaningless; they only show that the code runs. "
                    f"Sampling: {self.sampler()}.")
        return f"Profile: {self.name} ({self.reason}). Real models from the Hugging Face Hub. Sampling: {self.sampler()}."


def full_profile(reason: str) -> Profile:
    return Profile(
        name="full",
        reason=reason,
        random_weights=False,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        ip_adapter="h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors",
        image_encoder=None,  # h94/IP-Adapter/models/image_encoder (OpenCLIP ViT-H/14)
        eval_clip="openai/clip-vit-large-patch14",
        dino="facebook/dino-vits16",
        captioner="Salesforce/blip-image-captioning-base",
        dataset="Norod78/RickAndMorty-HorizontalMirror-blip-captions",
        resolution=512,
    )


def tiny_profile(reason: str) -> Profile:
    from . import tiny

    root = tiny.build_tiny_assets()
    return Profile(
        name="tiny",
        reason=reason,
        random_weights=True,
        base_model=str(root / "sd15"),
        ip_adapter=str(root / "ip_adapter" / tiny.IP_ADAPTER_FILE),
        image_encoder=None,
        eval_clip=str(root / "clip"),
        dino=str(root / "dino"),
        captioner=None,
        dataset=str(root / "dataset"),
        resolution=tiny.RESOLUTION,
        test_fraction=0.25,
        num_epochs=1,
        checkpoint_every=4,
        max_train_steps=8,
        num_inference_steps=4,
        eval_scales=(0.5, 1.0),
        eval_num_references=3,  # 3 x 2 prompts x 2 scales x 5 models = 60 images in CI
        eval_edits_per_reference=1,
    )


def get_profile(name: str | None = None, *, announce: bool = True, **overrides) -> Profile:
    """Resolve a profile: `name` ("full"/"tiny"), else $IPA_PROFILE, else auto (full with a CUDA GPU, tiny
    without).

    Prints one line saying which profile and why (announce=False to stay quiet). Keyword overrides
    replace fields; None keeps the profile's value, anything else is used (see Profile.replace).
    """
    name = (name or "").strip().lower()
    env_name = os.environ.get(PROFILE_ENV, "").strip().lower()
    # an explicit full/tiny wins; "auto" (a notebook's default) leaves the choice to $IPA_PROFILE
    requested = name if name not in ("", "auto") else (env_name or "auto")
    if requested not in NAMES:
        raise ValueError(f"unknown profile {requested!r}: choose one of {', '.join(NAMES)} (argument or ${PROFILE_ENV})")
    source = "asked for" if requested == name else f"${PROFILE_ENV}={env_name}"
    if requested == "auto":
        if torch.cuda.is_available():
            profile = full_profile(f"auto: CUDA GPU found ({torch.cuda.get_device_name(0)})")
        else:
            profile = tiny_profile(f"auto: no CUDA GPU, so the offline tiny models; set {PROFILE_ENV}=full to override")
    elif requested == "full":
        profile = full_profile(f"{source}")
    else:
        profile = tiny_profile(f"{source}")
    profile = profile.replace(**overrides)
    if announce:
        print(profile.banner())
    return profile
