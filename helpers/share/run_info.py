"""What a trained run and notebook 05 say about one adapter, read from their folders without loading a model.

    run = read_run("outputs/runs/text_aware")             # config.json, loss_log.csv, the adapter's metadata
    evaluation = read_evaluation("outputs/eval", run)     # notebook 05's summary rows of this model
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..data.prepared_folder import read_manifest
from ..evaluate.outputs import (  # 05's files, by their one writer's names, and the adapters they record
    HEADLINE_FILE,
    SUMMARY_FILE,
    TRADEOFF_FILE,
    recorded_adapters,
    split_headline,
)
from ..evaluate.results import RESULTS_FILE
from ..model.adapter_file import ADAPTER_FILE
from ..model.official_format import BLOCK_PREFIX
from ..profile import RICK_AND_MORTY
from ..sample.registry import FINETUNED, adapter_sha256
from ..train.config import read_run_settings
from ..train.loss_log import LOSS_LOG, read_loss_log


def eval_model_name(run: "RunInfo") -> str:
    """Notebook 05's model name for a run: by its folder (runs/text_aware_neighbour), else the self-paired
    model of its variant (helpers.sample.registry's one registry)."""
    by_folder = {folder: name for name, (folder, _) in FINETUNED.items()}
    by_variant = {variant: name for name, (folder, variant) in FINETUNED.items() if folder == variant}
    return by_folder.get(run.run_dir.name) or by_variant.get(run.variant, run.variant)


@dataclass
class RunInfo:
    """What one training run folder says about its adapter."""

    run_dir: Path
    adapter: Path
    variant: str  # "vanilla" or "text_aware"
    profile: str  # "full", "tiny", or "unknown"
    config: dict = field(default_factory=dict)  # config.json (helpers.train), {} if absent
    metadata: dict = field(default_factory=dict)  # the adapter file's string metadata
    steps: int | None = None  # from loss_log.csv
    train_seconds: float | None = None  # sum of the logged step times (model steps only, no loading)
    seconds_per_step: float | None = None  # median
    loss_start: float | None = None  # mean of the first 10% of logged losses
    loss_end: float | None = None  # mean of the last 10%
    data_source: str | None = None  # notebook 01's prepared.json "source", if found
    tensors: int = 0
    size_mb: float = 0.0

    @property
    def random_weights(self) -> bool:
        return self.profile == "tiny"

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model") or self.metadata.get("base_model") or "")

    @property
    def ip_adapter(self) -> str:
        return str(self.config.get("ip_adapter") or "")


def read_run(run_dir) -> RunInfo:
    """Read notebook 03's run folder (adapter.safetensors, config.json, loss_log.csv) without loading a model."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    adapter = run_dir / ADAPTER_FILE
    if not adapter.is_file():
        raise FileNotFoundError(f"{run_dir}: no {ADAPTER_FILE} here; train it in notebook 03 "
                                "(or python -m helpers.train) first, or pass the run's own folder")
    with safe_open(str(adapter), framework="pt", device="cpu") as f:
        metadata, keys = dict(f.metadata() or {}), list(f.keys())
    config = read_run_settings(run_dir) or json.loads(metadata.get("training_config", "{}"))
    variant = metadata.get("variant") or config.get("variant") or (
        "text_aware" if any(k.startswith(BLOCK_PREFIX) for k in keys) else "vanilla")
    info = RunInfo(run_dir, adapter, variant, str(config.get("profile") or "unknown"), config, metadata,
                   tensors=len(keys), size_mb=adapter.stat().st_size / 2**20)
    if (run_dir / LOSS_LOG).is_file() and (rows := read_loss_log(run_dir)):
        losses, secs = [r["loss"] for r in rows], [r["seconds"] for r in rows]
        k = max(1, len(rows) // 10)
        info.steps, info.train_seconds = rows[-1]["step"], sum(secs)
        info.seconds_per_step = statistics.median(secs)
        info.loss_start, info.loss_end = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    data_dir = config.get("data_dir")
    manifest = read_manifest(data_dir) if data_dir else None
    if manifest is not None:
        info.data_source = manifest.get("source")
    elif info.profile == "full":
        info.data_source = RICK_AND_MORTY
    return info


@dataclass
class Evaluation:
    """Notebook 05's summary rows for one model, and where its plot and headline are."""

    profile: str
    model: str
    rows: list[dict]  # summary.csv rows of this model
    clip_model: str = ""
    tradeoff: Path | None = None  # None when absent or made from another adapter of `model`
    headline: str = ""  # headline.txt's sentences; "" when absent or made from another adapter of `model`
    adapter_sha256: str = ""  # the identity of the adapter these rows, the plot and the headline are of
    left_out: list[str] = field(default_factory=list)  # why a plot or headline was left out, one line each


def read_evaluation(eval_dir, run: RunInfo, *, profile: str | None = None) -> Evaluation | None:
    """This run's rows of notebook 05's summary.csv (None when eval_dir has no summary or no such model, or when
    its rows were made by other weights than run.adapter's: their adapter_sha256 is not the file's, as after a
    retraining; then a line says so). tradeoff.png and headline.txt are taken only when they record run.adapter's
    identity for this model (helpers.evaluate.outputs.recorded_adapters); otherwise a line says why
    (not_of_adapter, also in `.left_out`) and the card goes without them.

    profile: the profile notebook 05 ran with (its files do not record it); default: the run's own."""
    eval_dir = Path(eval_dir)
    summary = eval_dir / SUMMARY_FILE
    model = eval_model_name(run)
    if not summary.is_file():
        return None
    with open(summary, newline="") as f:
        of_model = [r for r in csv.DictReader(f) if r.get("model") == model]
    if not of_model:
        return None
    current = adapter_sha256(run.adapter)
    rows = [r for r in of_model if r.get("adapter_sha256") == current]
    if not rows:
        print(f"{summary}: notebook 05's numbers for {model} are not of {run.adapter} (sha256 {current}; theirs: "
              f"{', '.join(sorted({r.get('adapter_sha256') or 'not recorded' for r in of_model}))}), so the card "
              "leaves them out. Run notebook 05 again to evaluate these weights.")
        return None
    clip_model = ""
    if (eval_dir / RESULTS_FILE).is_file():
        with open(eval_dir / RESULTS_FILE, newline="") as f:
            clip_model = next(csv.DictReader(f), {}).get("clip_model", "")
    evaluation = Evaluation(profile or run.profile, model, rows, clip_model, adapter_sha256=current)
    tradeoff, headline = eval_dir / TRADEOFF_FILE, eval_dir / HEADLINE_FILE
    for path in (tradeoff, headline):  # each shown only when it records this adapter for `model`
        if not path.is_file():
            continue
        why = not_of_adapter(path, model, current, run.adapter)
        if why is not None:
            print(why)
            evaluation.left_out.append(why)
        elif path == tradeoff:
            evaluation.tradeoff = tradeoff
        else:
            evaluation.headline = split_headline(headline.read_text())[0]
    return evaluation


def not_of_adapter(path: Path, model: str, current: str, adapter: Path | str = "the adapter") -> str | None:
    """Why notebook 05's file `path` (tradeoff.png, headline.txt) must not be shown with the adapter whose
    identity is `current`: one line, or None when the file records `model` with that identity
    (helpers.evaluate.outputs.recorded_adapters)."""
    recorded = recorded_adapters(path)
    if recorded is not None and recorded.get(model) == current:
        return None
    why = ("records no adapter (written before notebook 05 recorded them)" if recorded is None else
           f"does not show {model}" if model not in recorded else "was made from an earlier adapter")
    seen = f" (it records {model} as {recorded[model]}; {adapter} is {current})" if model in (recorded or {}) else ""
    return f"{path.name} {why}: run notebook 05 again{seen}. The card leaves it out ({path})."
