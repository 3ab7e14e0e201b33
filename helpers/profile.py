"""Which models, data and sizes a run uses: the `full` profile (Colab, real weights) or `tiny` (CI, random).

Every Hub id, size, count and path that differs between the two profiles lives here and nowhere else;
the notebooks and `helpers` read them from the `Profile` that `get_profile()` returns (or, for a default
argument, from the constants below).

    full  Stable Diffusion 1.5 + IP-Adapter Plus + the Rick and Morty drawings, 512 px: real results.
    tiny  the same code on small random models and a synthetic cartoon dataset built offline
          (helpers.tiny.assets): every number and picture it gives is meaningless, by design.
    auto  full with a CUDA GPU, tiny without. IPA_PROFILE=full|tiny|auto overrides the default.

A quick run (a notebook's QUICK_RUN field, or IPA_QUICK=1) keeps the profile's models and cuts the counts
(`Profile.quick_run`): a few training steps per variant, 2 references, 1 IP scale, few denoising steps.
It tries the whole series on real models in minutes before committing an hour. IPA_RESOLUTION=N trains and
samples at N px instead of the profile's size (a multiple of 64: smaller is faster, and worse).

The full profile's defaults fit one free Colab sitting at the speeds people measure on a T4 (8% of its fp16
peak for training, 12% for sampling: helpers.support.budget, which projects each notebook's minutes): notebook
03 at most 45 minutes, notebook 05 at most 45, the series at most 90. At those speeds a training run of 6 epochs
takes 16 minutes, so 03 trains the two models the headline compares (vanilla and text-aware, 33 minutes with
its samples) and the neighbour-paired model only when asked (`train_neighbour`, 16 minutes more: three runs
would be 49). 05's grid is the headline comparison alone (helpers.evaluate.protocol.GRID_MODELS; the other
models are `eval_models` away). The recipe (batch 4, 6 epochs) and the sampler (DDIM, 30 steps) stay the
seed's: cutting them would change what is measured, not only how long it takes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from .model.sd15 import DEFAULT_SCHEDULER

PROFILE_ENV = "IPA_PROFILE"
QUICK_ENV = "IPA_QUICK"
RESOLUTION_ENV = "IPA_RESOLUTION"
NAMES = ("auto", "full", "tiny")

# The full profile's models and data: the one place that names them
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IP_ADAPTER_PLUS = "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors"  # its image encoder: models/image_encoder
EVAL_CLIP = "openai/clip-vit-large-patch14"  # CLIP-T / CLIP-I: the IP-Adapter paper's and torchmetrics' default
DINO = "facebook/dino-vits16"  # DreamBooth's DINO metric
BLIP = "Salesforce/blip-image-captioning-base"  # captions for images that have none
CLIPSEG = "CIDAS/clipseg-rd64-refined"  # each drawing's character mask, from its caption's subject words
RICK_AND_MORTY = "Norod78/RickAndMorty-HorizontalMirror-blip-captions"

# a quick run: counts only, the models stay the profile's
QUICK_TRAIN_STEPS = 2  # per variant
QUICK_REFERENCES = 2
QUICK_SCALE = 0.7
QUICK_INFERENCE_STEPS = 4


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
    feature_batch_size: int = 16  # images per batch when caching VAE/CLIP features (helpers.data.features)
    # masks (helpers.data.masks): the segmenter (a transformers CLIPSeg: Hub id or folder), the threshold on its
    # sigmoid probability, and the loss weight of the background (notebook 03's MASK = "loss")
    segmenter: str = CLIPSEG
    mask_threshold: float = 0.5
    mask_background_weight: float = 0.1
    # training (the seed's recipe)
    train_batch_size: int = 4
    num_epochs: int = 6
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    checkpoint_every: int = 200  # steps
    max_train_steps: int | None = None  # None: num_epochs over the training split
    gradient_checkpointing: bool = False  # trade ~30% speed for activation memory (the OOM knob, with batch size)
    train_neighbour: bool = False  # notebook 03 also trains text-aware with neighbour pairing (opt-in: 16 T4 min)
    # sampling and evaluation
    scheduler: str = DEFAULT_SCHEDULER  # the sampler (a diffusers scheduler class name), set in load_pipeline
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    eval_scales: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    # held-out references (one per near-duplicate group); None: as many as fit eval_minutes of a T4, and at least
    # 10 (the counted budget at the expected 12% of its peak: helpers.evaluate.protocol.grid_references)
    eval_num_references: int | None = None
    eval_minutes: float = 45.0  # the default grid's generation time on a T4 (half a free Colab sitting)
    # the grid's models, names of helpers.sample.registry (or "all": every model of the bank); None: the headline
    # comparison, helpers.evaluate.protocol.GRID_MODELS
    eval_models: tuple[str, ...] | None = None
    eval_seeds: tuple[int, ...] = (0,)
    eval_edits_per_reference: int = 2  # edit prompts per reference, besides its own caption
    eval_batch_size: int | None = None  # images per pipeline call in the evaluation; None: sampling's choice
    sample_references: int = 3  # held-out references in notebook 04's gallery
    sweep_scales: tuple[float, ...] = (0.0, 0.4, 0.7, 1.0)  # notebook 04's IP-scale sweep
    quick: bool = False  # a quick run (quick_run): counts cut, models unchanged

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

    def quick_run(self) -> "Profile":
        """The same models with every count cut, to try the whole series in minutes: QUICK_TRAIN_STEPS
        training steps per variant, QUICK_REFERENCES references, one IP scale (QUICK_SCALE), one seed, one
        edit prompt per reference, QUICK_INFERENCE_STEPS denoising steps, a two-point scale sweep."""
        return dataclasses.replace(
            self, quick=True, num_epochs=1, max_train_steps=min(self.max_train_steps or QUICK_TRAIN_STEPS, QUICK_TRAIN_STEPS),
            num_inference_steps=min(self.num_inference_steps, QUICK_INFERENCE_STEPS),
            eval_num_references=min(self.eval_num_references or QUICK_REFERENCES, QUICK_REFERENCES),
            eval_scales=(QUICK_SCALE,),
            eval_seeds=self.eval_seeds[:1], eval_edits_per_reference=min(self.eval_edits_per_reference, 1),
            sample_references=min(self.sample_references, QUICK_REFERENCES), sweep_scales=(0.0, QUICK_SCALE))

    def banner(self) -> str:
        """Which profile and why, what its results mean, the sampler, and a quick run's or a resolution
        override's cuts (printed by get_profile)."""
        quick = (f" QUICK RUN: {self.max_train_steps} training steps, {self.num_inference_steps} denoising steps, "
                 f"{self.eval_num_references} references; counts too small for results.") if self.quick else ""
        size = f" {self.resolution} px (${RESOLUTION_ENV})." if os.environ.get(RESOLUTION_ENV, "").strip() else ""
        sampling = f" Sampling: {self.sampler()}."
        if self.random_weights:
            return (f"Profile: {self.name} ({self.reason}). Small RANDOM-weight models and synthetic data: "
                    "pictures and scores below are meaningless; they only show that the code runs." + sampling
                    + size + quick)
        return f"Profile: {self.name} ({self.reason}). Real models from the Hugging Face Hub." + sampling + size + quick


def full_profile(reason: str) -> Profile:
    return Profile(
        name="full",
        reason=reason,
        random_weights=False,
        base_model=SD15,
        ip_adapter=IP_ADAPTER_PLUS,
        image_encoder=None,  # the one beside IP_ADAPTER_PLUS (OpenCLIP ViT-H/14)
        eval_clip=EVAL_CLIP,
        dino=DINO,
        captioner=BLIP,
        segmenter=CLIPSEG,
        dataset=RICK_AND_MORTY,
        resolution=512,
    )


def tiny_profile(reason: str) -> Profile:
    from .tiny.assets import IP_ADAPTER_FILE, RESOLUTION, build_tiny_assets

    root = build_tiny_assets()
    return Profile(
        name="tiny",
        reason=reason,
        random_weights=True,
        base_model=str(root / "sd15"),
        ip_adapter=str(root / "ip_adapter" / IP_ADAPTER_FILE),
        image_encoder=None,
        eval_clip=str(root / "clip"),
        dino=str(root / "dino"),
        captioner=None,
        segmenter=str(root / "clipseg"),
        dataset=str(root / "dataset"),
        resolution=RESOLUTION,
        test_fraction=0.25,
        num_epochs=1,
        checkpoint_every=4,
        max_train_steps=8,
        num_inference_steps=4,
        eval_scales=(0.5, 1.0),
        eval_num_references=3,
        eval_edits_per_reference=1,
        train_neighbour=True,  # seconds here: notebook 03's neighbour-paired run stays under test
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_resolution() -> int | None:
    raw = os.environ.get(RESOLUTION_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 64 or int(raw) % 64:
        raise ValueError(f"${RESOLUTION_ENV}={raw!r}: give a size in pixels, a multiple of 64 (e.g. 256), or unset it")
    return int(raw)


CPU_FULL_PEAK_GB = 14.0  # RAM in use at the CPU path's peak (README: the 512 px rehearsal, notebook 02)
COLAB_FREE_RAM_GB = 12.7  # a free Colab runtime's RAM
NO_GPU_IN_COLAB = "\n".join([
    "!" * 100,
    "!!  THIS COLAB RUNTIME HAS NO GPU, so PROFILE = \"auto\" chose the TINY profile: small RANDOM-weight models.",
    "!!  Every picture and score below is meaningless. For the real models: Runtime > Change runtime type >",
    "!!  T4 GPU, then run the notebook again from the top.",
    "!" * 100])


class ProfileError(ValueError):
    """A profile that cannot run here (the full profile in Colab without a GPU); the message says what to do."""


def get_profile(name: str | None = None, *, announce: bool = True, quick: bool = False, **overrides) -> Profile:
    """Resolve a profile: `name` ("full"/"tiny"), else $IPA_PROFILE, else auto (full with a CUDA GPU, tiny
    without).

    quick=True (or $IPA_QUICK=1) makes it a quick run (Profile.quick_run); $IPA_RESOLUTION=N sets the
    resolution. Prints one line saying which profile and why (announce=False to stay quiet). Keyword
    overrides replace fields after that; None keeps the profile's value, anything else is used (see Profile.replace).
    """
    name = (name or "").strip().lower()
    env_name = os.environ.get(PROFILE_ENV, "").strip().lower()
    # an explicit full/tiny wins; "auto" (a notebook's default) leaves the choice to $IPA_PROFILE
    requested = name if name not in ("", "auto") else (env_name or "auto")
    if requested not in NAMES:
        raise ValueError(f"unknown profile {requested!r}: choose one of {', '.join(NAMES)} (argument or ${PROFILE_ENV})")
    source = "asked for" if requested == name else f"${PROFILE_ENV}={env_name}"
    colab_without_gpu = "google.colab" in sys.modules and not torch.cuda.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            profile = full_profile(f"auto: CUDA GPU found ({torch.cuda.get_device_name(0)})")
        else:
            profile = tiny_profile(f"auto: no CUDA GPU, so the offline tiny models; set {PROFILE_ENV}=full to override")
    elif requested == "full":
        if colab_without_gpu:  # refused before anything loads: the CPU path would run out of RAM hours later
            raise ProfileError(
                f"PROFILE = \"full\" needs a GPU in Colab, and this runtime has none. Stable Diffusion on the CPU "
                f"had {CPU_FULL_PEAK_GB} GB of RAM in use at its peak, and a free Colab runtime has about "
                f"{COLAB_FREE_RAM_GB} GB. Pick a T4: Runtime > Change runtime type > T4 GPU, then run the notebook "
                "again from the top. (PROFILE = \"tiny\" runs the code on small random models instead.)")
        profile = full_profile(f"{source}")
    else:
        profile = tiny_profile(f"{source}")
    if quick or _env_flag(QUICK_ENV):
        profile = profile.quick_run()
    profile = profile.replace(resolution=_env_resolution()).replace(**overrides)
    if announce:
        print(profile.banner())
        if requested == "auto" and colab_without_gpu:
            print(NO_GPU_IN_COLAB)
    return profile
