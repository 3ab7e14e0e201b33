"""One training run's parts, built once: the Accelerator, the data and feature cache, the UNet with the adapter,
the optimizer; and resuming, starting over and letting go of them.

    config = TrainConfig.from_profile(profile, output_dir=DIR, variant="text_aware")   # profile: get_profile()
    run = prepare_run(config)                                             # what every step shares
    start = resume(run)                                                   # the newest complete checkpoint's step
    release(run)                                                          # nothing of it stays on the device
"""

from __future__ import annotations

import dataclasses
import gc
import math
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.features import load_feature_cache, prepare_for_training
from ..model.adapter_file import ADAPTER_FILE
from ..model.official_format import adapter_parameters
from ..model.pipeline import load_unet
from ..support.device import choose_mixed_precision
from ..support.env import in_colab, output_root
from .checkpoints import (
    CheckpointMismatch,
    SettingsMismatch,
    delete_checkpoints,
    resume_from,
)
from .config import (
    RESUME_SETTINGS,
    RUN_SETTINGS,
    TrainConfig,
    batch_plan,
    comparable_settings,
    max_steps,
    recipe,
    run_profile,
)
from .errors import TrainingError
from .loss import DROP_RATES
from .loss_log import LOSS_LOG, LossLog
from .masking import Masking, check_mask, cost_line, prepare_masking
from .pairing import PAIRS_FILE, PairingError, run_pairs

RUN_FILES = (LOSS_LOG, ADAPTER_FILE, RUN_SETTINGS, PAIRS_FILE)  # what a fresh start deletes, besides the checkpoints


@dataclass
class Run:
    """Everything the steps of one training run share, built once by `prepare_run`."""

    config: TrainConfig
    accelerator: object  # accelerate.Accelerator
    profile: object  # helpers.profile.Profile: config.profile, or the one its name resolved to
    out: Path
    feats: dict[str, torch.Tensor]  # the feature cache (helpers.data.features), fp16 on the CPU; with MASK
    # reference or both, its image_embeds are the masked references' (helpers.train.masking)
    batch_size: int  # per process: the global batch / processes (config.batch_plan)
    steps_per_epoch: int
    max_steps: int
    every: int  # checkpoint interval in steps
    model: torch.nn.Module  # the UNet as Accelerate prepared it
    params: dict[str, torch.nn.Parameter]  # adapter_parameters(unet): what the optimizer updates, in fp32
    optimizer: torch.optim.Optimizer
    scheduler: object  # diffusers DDPMScheduler
    scaling: float  # the VAE's latent scaling factor
    settings: dict = dataclasses.field(default_factory=dict)  # config.json: every value this run uses
    log: LossLog | None = None  # the buffered loss log (train() makes it once the start step is known)
    pairs: object = None  # helpers.train.pairing.Pairs; None: self pairing
    masking: Masking | None = None  # helpers.train.masking; None: MASK none
    lock: object = None  # helpers.support.lock.FolderLock of `out`, held by train() for the whole run


def prepare_run(config: TrainConfig, *, progress: bool = True) -> Run:
    """Everything a run needs, in five steps: Accelerate and the recipe on config's profile (the Profile it
    carries, used as it is; a name is resolved here, once) with the batch split over the processes (a count
    that does not divide the global batch raises TrainingError), the data and its feature cache
    (built if missing) with the pairs, a masked run's masks and masked features (its cost printed first), the
    UNet with the adapter (trainable in fp32, the rest frozen in the mixed-precision dtype) and AdamW prepared
    by Accelerate, and the settings the run records."""
    accelerator, profile, mp, r = _accelerator_and_recipe(config)
    main = accelerator.is_main_process
    data_dir = Path(config.data_dir) if config.data_dir else output_root(colab=in_colab(), drive=False) / "data"
    prep, feats, cache_meta, pairs, cache_path = _data(config, accelerator, profile, data_dir, progress=progress and main)
    n = feats["image_embeds"].shape[0]
    steps_per_epoch = math.ceil(n / r["global_batch_size"])
    steps = max_steps(config, profile, steps_per_epoch)
    masking = _masking(config, accelerator, profile, prep, cache_path, feats, pairs, r, steps, progress=progress and main)
    if masking is not None:
        feats = masking.apply(feats, pairs)
    model, params, optimizer = _model(config, accelerator, profile, mp, r, feats["image_embeds"].shape[-1])
    settings = {**config.values(), **r, "max_steps": steps, "steps_per_epoch": steps_per_epoch,
                "train_images": n, "data": cache_meta["fingerprint"][:16], "data_dir": str(data_dir),
                "data_source": prep.info.get("source"), "resolution": prep.info.get("resolution"),
                "test_fraction": prep.info.get("test_fraction"),
                "trainable_parameters": sum(p.numel() for p in params.values()), "mixed_precision": mp,
                "profile": profile.name, "base_model": profile.base_model, "ip_adapter": profile.ip_adapter,
                "drop_rates": DROP_RATES,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "pairing_self_prob": pairs.self_prob if pairs else None, "pairing_rule": pairs.rule if pairs else None,
                "masks": None, "mask_background_weight": None, **(masking.settings() if masking else {})}
    from diffusers import DDPMScheduler

    return Run(config, accelerator, profile, Path(config.output_dir), feats, r["per_process_batch_size"], steps_per_epoch, steps,
               r["checkpoint_every"], model, params, optimizer,
               DDPMScheduler.from_pretrained(profile.base_model, subfolder="scheduler"),
               _vae_scaling_factor(profile.base_model), settings, pairs=pairs, masking=masking)


def _accelerator_and_recipe(config: TrainConfig):
    """Step 1: the Accelerator (mixed precision from the hardware), the seed, the profile, the recipe with
    the batch plan (batch_size: the recipe's global batch; learning_rate: the one used; the plan's keys)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = choose_mixed_precision(config.mixed_precision)
    # cpu=True without a GPU: then torchrun gives Accelerate a multi-CPU (gloo) run instead of N lone ones
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    profile = run_profile(config, announce=accelerator.is_main_process)  # models and recipe defaults
    try:
        r = recipe(config, profile)
        plan = batch_plan(r["batch_size"], r["learning_rate"], accelerator.num_processes, config.scale_batch_with_gpus)
        return accelerator, profile, mp, {**r, **plan}
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _data(config: TrainConfig, accelerator, profile, data_dir: Path, *, progress: bool):
    """Step 2: notebook 01's data and its feature cache (the main process prepares the data, then every process
    encodes its share of the cache), a fresh start if asked, and the pairs of a non-self pairing. Returns (prep,
    features, cache metadata, pairs or None, the cache's path)."""
    main = accelerator.is_main_process
    # every process: the main one prepares the data first, then all share the cache's encoding
    prep, cache_path = prepare_for_training(profile, data_dir, progress=progress, announce=main,
                                            dataset=config.dataset, resolution=config.resolution,
                                            test_fraction=config.test_fraction)
    feats, cache_meta = load_feature_cache(cache_path)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # this run's own peak: from here on (the cache step freed its models)
    if config.fresh_start:  # before the pairs: a fresh start may change the pairing
        if main:
            print(start_over(Path(config.output_dir)))
        accelerator.wait_for_everyone()
    try:
        with accelerator.main_process_first():  # the main process makes and saves the pairs; the others read them
            pairs = run_pairs(config.pairing, config.pairing_self_prob, Path(config.output_dir), profile, prep,
                              cache_path, feats, cache_meta, write=main, progress=progress)
    except PairingError as e:
        raise TrainingError(str(e)) from None
    return prep, feats, cache_meta, pairs, cache_path


def _masking(config: TrainConfig, accelerator, profile, prep, cache_path, feats, pairs, r: dict, steps: int, *,
             progress: bool) -> Masking | None:
    """Step 3, MASK other than none: the run's cost, printed before anything else of it (helpers.train.masking.
    cost_line), then the masks and the masked features (the main process makes what is missing, the others
    then read it). None for MASK none."""
    try:
        if check_mask(config.mask) == "none":
            return None
    except ValueError as e:
        raise TrainingError(str(e)) from None
    main = accelerator.is_main_process
    if main:
        print(cost_line(config.mask, config.variant, steps, len(prep.train), checkpointing=r["gradient_checkpointing"],
                        gpus=accelerator.num_processes, mirror=config.pairing == "mirror"))
    try:
        with accelerator.main_process_first():
            return prepare_masking(config.mask, prep, profile, cache_path, feats, pairs, progress=progress,
                                   announce=main)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _model(config: TrainConfig, accelerator, profile, mp: str, r: dict, image_encoder_dim: int):
    """Step 4: the UNet with the adapter, frozen in the mixed-precision dtype but for the adapter's parameters
    (fp32: GradScaler needs them so), and AdamW over those, prepared by Accelerate."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    unet = load_unet(profile.base_model, profile.ip_adapter, variant=config.variant,
                     image_encoder_dim=image_encoder_dim, device=accelerator.device, dtype=weight_dtype)
    unet.requires_grad_(False)
    params = adapter_parameters(unet)
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    if r["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(list(params.values()), lr=r["learning_rate"], weight_decay=r["weight_decay"])
    model, optimizer = accelerator.prepare(unet, optimizer)
    return model, params, optimizer


def resume(run: Run) -> int:
    """Load the newest complete checkpoint of run.out, verified, if any (and say so); returns the step to start
    from. An incomplete or damaged newest one falls back to the one before, with a message naming the file,
    and (main process) is deleted: this run writes it again. One written with other RESUME_SETTINGS than this
    run's raises TrainingError naming each difference (helpers.train.checkpoints.resume_from)."""
    main = run.accelerator.is_main_process
    try:
        step, path, state = resume_from(run.out, run.settings, RESUME_SETTINGS, run.params, run.optimizer,
                                        say=print if main else (lambda _: None), discard=main,
                                        read_saved=comparable_settings)
    except (CheckpointMismatch, SettingsMismatch) as e:
        raise TrainingError(str(e)) from None
    if path is None:
        return 0
    if state.get("scaler") and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    if main:
        print(f"Resuming from {path} (step {step} of {run.max_steps}).")
    return step


def start_over(out: Path) -> str:
    """Delete a run folder's checkpoints, loss log, adapter and config (a fresh start); says what went."""
    gone = [f"{p.name} ({size / 2**20:,.0f} MiB)" for p, size in delete_checkpoints(out)]
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            gone.append(name)
    if not gone:
        return f"Fresh start in {out} (nothing there to delete)."
    return (f"Fresh start: deleted the earlier run's {', '.join(gone)} in {out} (on Google Drive they go to the "
            "trash, which counts against your quota until you empty it). Turn FRESH_START off again, or a rerun "
            "after a disconnect deletes this run too.")


def release(run: Run | None) -> None:
    """Drop everything a run holds (model, optimizer, parameters, feature cache, Accelerate's references to
    them), collect, and empty the CUDA cache, so that the next run starts from an empty device."""
    if run is not None:
        run.accelerator.free_memory()
        run.accelerator.scaler = None
        run.model = run.optimizer = run.params = run.feats = run.scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in an exception's traceback and in those of the
    exceptions it chains (an out-of-memory error's frames hold the step's activations)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _vae_scaling_factor(base_model) -> float:
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(base_model, subfolder="vae").get("scaling_factor", 0.18215))
