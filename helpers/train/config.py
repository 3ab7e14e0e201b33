"""The settings of a training run: TrainConfig, how its values resolve against the profile, and the command
line that sets them (`python -m helpers.train`, see helpers.train).

A run's settings travel as one object: the Profile (helpers.profile, with the notebook's overrides) and the
run's own values on it, `TrainConfig.from_profile(profile, output_dir=..., variant=..., **overrides)`; the run
uses that Profile as it is, never a second lookup by name. None, in every TrainConfig field that has it, means
"the profile's value"; any other value is used as given. The data settings (dataset, resolution,
test_fraction) are not defaults but expectations: the data is what notebook 01 prepared in data_dir, and a
given value must match it (helpers.data.prepare.use_prepared).

The batch: `batch_size` is the recipe's GLOBAL batch, the samples of one optimizer step over all processes
together (4: 4 on one GPU, 2 per GPU on two), so a run on any number of GPUs takes the steps one T4 takes, on
the same rows (helpers.train.step). `batch_plan` splits it and refuses a process count that does not divide
it. scale_batch_with_gpus=True chooses a larger global batch instead: batch_size on EACH process, and the
learning rate scaled linearly with the global batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
lr x (global batch / batch_size). config.json records global_batch_size, per_process_batch_size,
num_processes and the learning rate used.

The command line carries a TrainConfig whole (`config_args`, the flags that `parse_config` reads back): what
helpers.train.launch hands to `accelerate launch -m helpers.train` to train on every GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..profile import Profile, get_profile
from ..support.atomic import write_json
from .masking import MASKS
from .pairing import PAIRINGS

RUN_SETTINGS = "config.json"  # every value a run used, in its folder (written by helpers.train.loop)

# what a resumed run must share with the checkpoint it resumes (settings name -> words for the message);
# `comparable_settings` reads older checkpoints' settings in today's terms
RESUME_SETTINGS = {"variant": "variant", "global_batch_size": "global batch size (all processes together)",
                   "learning_rate": "learning rate", "weight_decay": "weight decay", "seed": "seed",
                   "num_processes": "number of processes (GPUs)", "mask": "mask (MASK: none, reference, loss or both)",
                   "masks": "masks (fingerprint of notebook 01's masks.safetensors: segmenter, threshold, data)",
                   "mask_background_weight": "mask background weight (profile.mask_background_weight)",
                   "data": "training data (fingerprint of notebook 01's images and captions, resolution and models)"}


@dataclass
class TrainConfig:
    output_dir: str
    variant: str = "text_aware"
    # the Profile the run uses as it is (from_profile); a name instead ("auto", "full", "tiny") is resolved once,
    # by the run (run_profile)
    profile: Profile | str = "auto"
    data_dir: str | None = None  # default: <output root>/data (notebook 01's folder), used as it is
    # the data asked for: None = whatever data_dir holds; given, it must match (helpers.data.prepare.use_prepared)
    dataset: str | None = None
    resolution: int | None = None
    test_fraction: float | None = None
    # None means the profile's value in every field below
    batch_size: int | None = None  # the GLOBAL batch, all processes together; the profile's: 4
    epochs: int | None = None  # the profile's: 6
    max_steps: int | None = None  # the profile's, else epochs over the training split
    learning_rate: float | None = None
    weight_decay: float | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    mixed_precision: str = "auto"  # auto: fp16 on a T4 (no native bf16), bf16 on Ampere+, no on a CPU
    gradient_checkpointing: bool | None = None
    max_grad_norm: float = 1.0
    keep_checkpoints: int = 2  # 2: an incomplete newest checkpoint can fall back to the one before
    fresh_start: bool = False  # delete output_dir's checkpoints, loss log and adapter first, and start at step 0
    pairing: str = "self"  # self | mirror | neighbour (helpers.train.pairing)
    pairing_self_prob: float | None = None  # mirror/neighbour: fraction of samples kept self; None: 0.25
    mask: str = "none"  # none | reference | loss | both (helpers.train.masking)
    # True: batch_size on EACH process (global batch x processes) and the learning rate scaled with it (batch_plan)
    scale_batch_with_gpus: bool = False

    @classmethod
    def from_profile(cls, profile: Profile, output_dir, variant: str = "text_aware", **overrides) -> "TrainConfig":
        """The settings of a run on `profile` (get_profile's Profile, with the notebook's overrides), which the
        run then uses as it is. `overrides` are TrainConfig fields (data_dir=..., seed=1, pairing="mirror",
        batch_size=8, ...); None keeps the field's default, which for the recipe's fields is the profile's
        value. Raises TypeError for a name instead of a Profile, or for a field TrainConfig does not have."""
        if not isinstance(profile, Profile):
            raise TypeError(f"from_profile takes a helpers.profile.Profile, not {profile!r}: "
                            "get_profile(name) gives one")
        own = {f.name for f in dataclasses.fields(cls)} - {"profile", "output_dir", "variant"}
        unknown = sorted(set(overrides) - own)
        if unknown:
            raise TypeError(f"TrainConfig has no field {', '.join(unknown)}; the fields are {', '.join(sorted(own))}")
        return cls(output_dir=str(output_dir), variant=variant, profile=profile,
                   **{k: v for k, v in overrides.items() if v is not None})

    def values(self) -> dict:
        """Every field as config.json records it: the profile by its name."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "profile": getattr(self.profile, "name", self.profile)}


def run_profile(config: TrainConfig, *, announce: bool = True) -> Profile:
    """The Profile a run uses: config.profile itself when it is one (TrainConfig.from_profile), with no second
    lookup; else the profile of that name, resolved here, once (get_profile)."""
    if isinstance(config.profile, Profile):
        return config.profile
    return get_profile(config.profile, announce=announce)


def or_default(value, default):
    """A setting: the given value, or the default when it is None (0 and False are values)."""
    return default if value is None else value


def recipe(config: TrainConfig, profile: Profile) -> dict:
    """batch_size, epochs, learning_rate, weight_decay, checkpoint_every and gradient_checkpointing of this run:
    the config's values, the profile's where None. Raises ValueError for a value that cannot work."""
    values = {"batch_size": or_default(config.batch_size, profile.train_batch_size),
              "epochs": or_default(config.epochs, profile.num_epochs),
              "learning_rate": or_default(config.learning_rate, profile.learning_rate),
              "weight_decay": or_default(config.weight_decay, profile.weight_decay),
              "checkpoint_every": or_default(config.checkpoint_every, profile.checkpoint_every),
              "gradient_checkpointing": or_default(config.gradient_checkpointing, profile.gradient_checkpointing)}
    checks = {**{k: values[k] for k in ("batch_size", "epochs", "learning_rate", "checkpoint_every")},
              "keep_checkpoints": config.keep_checkpoints}
    bad = [f"{k} = {v!r}" for k, v in checks.items() if v is not None and not v > 0]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be above 0 (leave a setting at None for the profile's value)")
    return values


def batch_plan(batch_size: int, learning_rate: float, num_processes: int, scale_with_gpus: bool = False) -> dict:
    """How a run's batch spreads over its `num_processes` processes, and the learning rate that goes with it.
    batch_size is the recipe's global batch and learning_rate the rate the recipe gives for it. Default: the
    global batch stays batch_size and each process takes batch_size / num_processes. scale_with_gpus: each
    process takes batch_size, the global batch is batch_size x num_processes, and the learning rate grows
    with it: learning_rate x global / batch_size (the linear scaling rule).

    Returns {"global_batch_size", "per_process_batch_size", "num_processes", "learning_rate" (the one used),
    "learning_rate_rule" (in words)}. Raises ValueError for a process count that does not divide the batch."""
    if scale_with_gpus:
        per, total = batch_size, batch_size * num_processes
    elif batch_size % num_processes:
        raise ValueError(
            f"the global batch of {batch_size} does not split over {num_processes} processes (GPUs): each takes "
            f"an equal share. Choose a global batch that {num_processes} divides (--batch-size, BATCH_SIZE in "
            f"notebook 03), use {' or '.join(str(n) for n in range(1, num_processes) if batch_size % n == 0)} "
            "processes, or take batch_size on each GPU with the learning rate scaled (--scale-batch-with-gpus, "
            "SCALE_BATCH_WITH_GPUS)")
    else:
        per, total = batch_size // num_processes, batch_size
    lr = learning_rate * total / batch_size
    rule = (f"{learning_rate:g}, the recipe's for a batch of {batch_size}" if total == batch_size else
            f"{lr:g} = {learning_rate:g} x {total} / {batch_size} (linear scaling with the global batch)")
    return {"global_batch_size": total, "per_process_batch_size": per, "num_processes": num_processes,
            "learning_rate": lr, "learning_rate_rule": rule}


def comparable_settings(saved: dict) -> dict:
    """A checkpoint's saved settings in today's terms, for the RESUME_SETTINGS comparison: before the global
    batch, `batch_size` was per process, so an older record's global batch is batch_size x num_processes;
    before masks, every run was unmasked (mask "none")."""
    if "mask" not in saved:
        saved = {**saved, "mask": "none"}
    if "global_batch_size" in saved or "batch_size" not in saved:
        return saved
    return {**saved, "global_batch_size": saved["batch_size"] * (saved.get("num_processes") or 1)}


def max_steps(config: TrainConfig, profile: Profile, steps_per_epoch: int) -> int:
    """The run's length: max_steps if given, else epochs over the training split if given, else the profile's
    max_train_steps, else the profile's epochs."""
    if config.max_steps is not None:
        return config.max_steps
    if config.epochs is None and profile.max_train_steps is not None:
        return profile.max_train_steps
    return or_default(config.epochs, profile.num_epochs) * steps_per_epoch


def argument_parser(description: str = "") -> argparse.ArgumentParser:
    """The options of `python -m helpers.train`: one per TrainConfig field (the profile by its name)."""
    ap = argparse.ArgumentParser(prog="python -m helpers.train", description=description)
    ap.add_argument("--profile", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--variant", default="text_aware", choices=["vanilla", "text_aware"])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--data-dir", default=None,
                    help="notebook 01's prepared data, used as it is (default: <output root>/data; prepared from "
                         "the profile's dataset only if missing)")
    ap.add_argument("--dataset", help="the data source you expect --data-dir to hold: a mismatch stops the run")
    ap.add_argument("--resolution", type=int, help="the resolution you expect --data-dir to hold")
    ap.add_argument("--test-fraction", type=float, help="the test fraction you expect --data-dir to hold")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int,
                    help="the GLOBAL batch, all processes together (the profile's: 4); each of N processes takes 1/N")
    ap.add_argument("--scale-batch-with-gpus", action="store_true",
                    help="--batch-size on EACH process instead, and the learning rate x the number of processes")
    ap.add_argument("--learning-rate", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--keep-checkpoints", type=int, default=2)
    ap.add_argument("--fresh-start", action="store_true",
                    help="delete --output-dir's checkpoints, loss log and adapter, and train from step 0")
    ap.add_argument("--pairing", default="self", choices=PAIRINGS,
                    help="the reference of each target: itself (default), its mirror, or its nearest other drawing")
    ap.add_argument("--pairing-self-prob", type=float, default=None,
                    help="mirror/neighbour: fraction of samples that keep their own image (default 0.25)")
    ap.add_argument("--mask", default="none", choices=MASKS,
                    help="train on the character (notebook 01's masks): 'reference' fills the reference's background, "
                         "'loss' weights the loss by the target's mask, 'both'; default none")
    return ap


def config_from_args(args: dict, parser: argparse.ArgumentParser) -> TrainConfig:
    """The TrainConfig of parsed options (vars(parser.parse_args())): the --profile, resolved once here
    (announced by the first process of a launch only), and the run's own values on it (from_profile). A
    profile that cannot be used (get_profile's ValueError) ends the command with argparse's usage error."""
    args = dict(args)
    try:
        profile = get_profile(args.pop("profile"), announce=os.environ.get("RANK", "0") == "0")  # torchrun sets RANK
    except ValueError as e:
        parser.error(str(e))
    return TrainConfig.from_profile(profile, **args)


def parse_config(argv=None, description: str = "") -> TrainConfig:
    """The TrainConfig that `python -m helpers.train` arguments ask for (argument_parser, config_from_args)."""
    ap = argument_parser(description)
    return config_from_args(vars(ap.parse_args(argv)), ap)


def resolved(config: TrainConfig) -> TrainConfig:
    """The same run with every recipe value the profile supplies written out (batch_size, learning_rate,
    weight_decay, checkpoint_every, gradient_checkpointing, epochs; max_steps where the profile's
    max_train_steps decides the length), so that it no longer depends on the profile's overrides: what
    `config_args` puts on the command line."""
    profile = run_profile(config, announce=False)
    r = recipe(config, profile)
    steps = (config.max_steps if config.max_steps is not None else
             profile.max_train_steps if config.epochs is None else None)  # the rule of max_steps()
    return dataclasses.replace(config, **{k: r[k] for k in ("batch_size", "learning_rate", "weight_decay",
                                                            "checkpoint_every", "gradient_checkpointing", "epochs")},
                               max_steps=steps)


def config_args(config: TrainConfig) -> list[str]:
    """The `python -m helpers.train` options of a run: every value of resolved(config), the profile by its
    name. parse_config(config_args(c)) gives resolved(c) again, on the profile of that name resolved afresh
    (helpers.train.launch checks that it is the same as c's)."""
    c = resolved(config)
    profile = getattr(c.profile, "name", c.profile)
    args = ["--profile", profile, "--variant", c.variant, "--output-dir", str(c.output_dir)]
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("profile", "variant", "output_dir") or value is None:
            continue
        if f.name == "gradient_checkpointing":
            args.append(flag if value else "--no-gradient-checkpointing")
        elif isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


def write_run_settings(run_dir, settings: dict) -> Path:
    """Write run_dir/config.json (atomically): every value a run uses."""
    return write_json(Path(run_dir) / RUN_SETTINGS, settings, indent=2)


def read_run_settings(run_dir) -> dict:
    """A run's config.json as a dict ({} when the folder has none)."""
    path = Path(run_dir) / RUN_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}
