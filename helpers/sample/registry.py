"""The models this project compares, by name: one registry, and nothing heavy imported (helpers.evaluate.stats,
the model card and the bank all read it).

`MODELS` is name -> ModelSpec (what the model is, where its weights come from), in the order every table and
plot uses (`model_order`); `label(name)` is what plots and tables call it. A trained model is an entry with
a `folder` under notebook 03's runs/; a baseline or ablation is an entry with a `source` (the model whose
weights it reuses) and what it changes: `block=False`, `ip_layers` or `attention`. To add a model, add an entry
(docs/architecture.md, "Where to change what"); helpers.sample.bank loads it.

The masked runs (notebook 03's MASK, helpers.train.masking) are entries with a `mask`, in run folders named
<twin's folder>-mask_<mask> (helpers.train.pairing.run_name); `masked_twins()` pairs each with the unmasked run
it differs from by the mask alone. Like every trained model they are in the bank once their folder holds an
adapter, and in notebook 05's grid only when asked (Profile.eval_models), never in the default one.

The models notebook 03 trains only when asked (the neighbour-paired and masked runs) name that setting in
`opt_in`: while untrained they share one line of the bank's notes (`opt_in_note`), not one line each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PRETRAINED = "pretrained"

# InstantStyle (arXiv 2404.02733), its SD 1.5 script: style + layout blocks. (Style only: ("up_blocks.1",).)
# SD 1.5's up_blocks.0 has no attention: an SDXL-style "up_blocks.0" would leave every IP layer at 0.
INSTANTSTYLE_SD15 = ("down_blocks.2", "mid_block", "up_blocks.1")


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry: what the model is and where its adapter weights come from."""

    label: str  # what it is, as plots and tables call it
    folder: str | None = None  # trained by notebook 03: runs_dir/<folder>/adapter.safetensors
    variant: str = "vanilla"  # "vanilla" or "text_aware" (of the file in `folder`)
    source: str | None = None  # a baseline or ablation: reuse this model's adapter weights
    block: bool = True  # False: run without the source's text-image block
    ip_layers: tuple[str, ...] | None = None  # IP-Adapter only in these UNet blocks (others at scale 0); None: all
    attention: str | None = None  # "conceptrol": IP attention masked by the prompt's subject (helpers.model.conceptrol)
    mask: str = "none"  # trained with MASK "reference", "loss" or "both" (helpers.train.masking); "none": unmasked
    opt_in: str = ""  # the notebook 03 setting that trains it, for a model trained only when asked; "": by default


MODELS: dict[str, ModelSpec] = {
    PRETRAINED: ModelSpec("IP-Adapter Plus (pretrained)"),
    "pretrained-instantstyle": ModelSpec("+ InstantStyle layers", source=PRETRAINED, ip_layers=INSTANTSTYLE_SD15),
    # Conceptrol (He and Yao, 2025, arXiv 2503.06568), training-free: every IP layer's output masked by the
    # prompt's attention to the words naming the subject (helpers.data.subjects), global masking
    "pretrained-conceptrol": ModelSpec("+ Conceptrol", source=PRETRAINED, attention="conceptrol"),
    "finetuned-vanilla": ModelSpec("fine-tuned vanilla", folder="vanilla", variant="vanilla"),
    "finetuned-text-aware": ModelSpec("fine-tuned text-aware", folder="text_aware", variant="text_aware"),
    "finetuned-text-aware-no-block": ModelSpec("fine-tuned text-aware, block removed", source="finetuned-text-aware",
                                               block=False),
    "finetuned-text-aware-neighbour": ModelSpec("fine-tuned text-aware, neighbour pairing",
                                                folder="text_aware_neighbour", variant="text_aware",
                                                opt_in="TRAIN_NEIGHBOUR = True"),
    # trained on the character (opt-in, notebook 03's MASK): the reference's background filled, the loss
    # weighted by the target's mask, or both; each against its twin finetuned-text-aware
    "finetuned-text-aware-mask-reference": ModelSpec("fine-tuned text-aware, masked reference",
                                                     folder="text_aware-mask_reference", variant="text_aware",
                                                     mask="reference", opt_in='MASK = "reference"'),
    "finetuned-text-aware-mask-loss": ModelSpec("fine-tuned text-aware, masked loss", folder="text_aware-mask_loss",
                                                variant="text_aware", mask="loss", opt_in='MASK = "loss"'),
    "finetuned-text-aware-mask-both": ModelSpec("fine-tuned text-aware, masked reference and loss",
                                                folder="text_aware-mask_both", variant="text_aware", mask="both",
                                                opt_in='MASK = "both"'),
}

FINETUNED = {name: (m.folder, m.variant) for name, m in MODELS.items() if m.folder}  # name -> (folder, variant)

BASELINES = tuple(name for name, m in MODELS.items() if m.source)  # derived from another model's weights

MODEL_NAMES = tuple(MODELS)

MASK_FOLDER = "-mask_"  # a masked run's folder: <its twin's folder>-mask_<mask> (helpers.train.pairing.run_name)


def masked_twins() -> dict[str, str]:
    """{masked model: its unmasked twin}: for each registry model trained with a mask, the registry model whose
    run folder is the same but for the mask (same variant, pairing and recipe), e.g.
    "finetuned-text-aware-mask-loss" -> "finetuned-text-aware"."""
    by_folder = {m.folder: name for name, m in MODELS.items() if m.folder and m.mask == "none"}
    return {name: by_folder[m.folder.split(MASK_FOLDER)[0]] for name, m in MODELS.items()
            if m.folder and m.mask != "none"}


def opt_in_note(names) -> str:
    """One line for opt-in models (ModelSpec.opt_in) that notebook 03 has not trained: their names and the setting
    that trains each, e.g. 'Not trained (opt-in, each one notebook 03 setting away): finetuned-text-aware-neighbour
    (TRAIN_NEIGHBOUR = True), finetuned-text-aware-mask-loss (MASK = "loss").'"""
    return ("Not trained (opt-in, each one notebook 03 setting away): "
            + ", ".join(f"{n} ({MODELS[n].opt_in})" for n in names) + ".")


def label(name: str) -> str:
    """What a model is, for plots and tables ("fine-tuned text-aware"); other names (extra models) as given."""
    spec = MODELS.get(name)
    return spec.label if spec is not None else str(name)


def model_order(names) -> list[str]:
    """Distinct names in MODEL_NAMES order, then any others sorted (the order of every table and plot)."""
    names = list(dict.fromkeys(names))
    return [m for m in MODEL_NAMES if m in names] + sorted(m for m in names if m not in MODEL_NAMES)


ADAPTER_ID_DIGITS = 16  # hex digits of the sha256 kept: 64 bits, no accidental match between two files


def adapter_sha256(path) -> str:
    """The identity of a model's weights: the first ADAPTER_ID_DIGITS hex digits of the sha256 of the adapter file
    they were read from (a fine-tuned adapter.safetensors, an extra model's file, or the profile's IP-Adapter file
    for the pretrained model and its training-free baselines). Each row of notebook 05's results.csv carries it.

    A content hash, not a training id: it names the weights themselves, whoever wrote the file. The pretrained
    h94 file and a file from the Hub or another machine carry no training id; a retrained run (FRESH_START,
    another seed) writes a new file with new bytes, so a new hash, even at the same path and settings; and a
    file copied elsewhere keeps its hash. Reading ~100 MB once per bank load costs a fraction of loading it.
    Cached per (path, size, modification time) within a process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()[:ADAPTER_ID_DIGITS]
    return _SHA256[key]


_SHA256: dict[tuple, str] = {}


def parse_models(text: str) -> dict[str, str]:
    """A notebook form field 'name=spec, spec2' -> {'name': 'spec', '<last part of spec2>': 'spec2'}
    (spec: a Hub id, a run folder or an adapter file, as resolve_adapter takes)."""
    out = {}
    for item in (t.strip() for t in text.replace("\n", ",").split(",")):
        if not item:
            continue
        name, _, spec = item.partition("=") if "=" in item else ("", "", item)
        spec = spec.strip()
        name = name.strip() or Path(spec.rstrip("/")).name.removesuffix(".safetensors")
        if name in out:
            raise ValueError(f"two models named {name!r} in {text!r}: name them, as 'name=user/repo'")
        out[name] = spec
    return out
