"""Which reference image each training target is conditioned on: `self`, `mirror` or `neighbour` pairing.

A training step reconstructs drawing X (its latent, its caption). The image features it is conditioned on
decide what the adapter learns. With X's own features the easiest solution is to copy X and ignore the
prompt (IP-Adapter's maintainers say so in tencent-ailab/IP-Adapter issue 94).

    self       X itself: the seed's objective and IP-Adapter's, the default (training exactly as before)
    mirror     X flipped left to right: the image encoder's features of the mirrored image
               (helpers.data.features.cache_mirror_features). The identity stays; the exact layout does not.
    neighbour  another drawing, most likely of the same character: X's nearest drawing in the training split
               by image-encoder features, outside X's near-duplicate group (so never X's own mirror copy).
               The model must keep the identity and take everything else from the caption. "Nearest" is
               the highest cosine similarity between CLS tokens of the cached penultimate hidden states
               (image_embeds[:, 0]), centred on the training split's mean. Without centring, the component
               that all CLIP features share dominates every cosine.

A non-self pairing keeps X's own features for a fraction `self_prob` of the samples. The default,
DEFAULT_SELF_PROB = 0.25, keeps about one sample per batch of 4 on IP-Adapter's reconstruction objective, so
the reference's detail is not unlearned, while three in four teach steering. The draw is per sample, from
(seed, step, process) alone, so a resumed run draws exactly what an uninterrupted one draws. The feature cache
holds only the training split, so every reference comes from the training split.

    pairs = make_pairs("neighbour", features, cache_meta, ids, groups)  # once, from the feature cache
    pairs = run_pairs(...)       # helpers.train: made, or read back from runs/<name>/pairs.json on resume
    refs = pairs.references(features, rows, seed=0, step=12)           # (B, 257, 1280) for one batch
    fig = show_pairs(pairs, prep.train, n=8)                            # target | reference, captions, cosine
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.features import cache_mirror_features
from ..support.atomic import write_json
from .checkpoints import list_checkpoints

PAIRINGS = ("self", "mirror", "neighbour")
DEFAULT_SELF_PROB = 0.25
PAIRS_FILE = "pairs.json"
RULES = {
    "mirror": "the target's own drawing mirrored left to right (image-encoder features of the flipped image)",
    "neighbour": "the nearest other training drawing outside the target's near-duplicate group, by cosine of "
                 "the CLS token of the image encoder's penultimate hidden states, centred on the training split's mean",
}
_SAVED = ("pairing", "self_prob", "ids", "reference", "similarity", "cache_fingerprint", "rule")  # pairs.json
_STREAM = 0x70A1  # tells the self-mix draws apart from every other seeded stream of a step


class PairingError(ValueError):
    """A pairing that cannot be used (unknown name, bad probability, a run folder trained otherwise)."""


def run_name(variant: str, pairing: str = "self", mask: str = "none") -> str:
    """The run folder under runs/ for a variant trained with a pairing and a mask (helpers.train.masking):
    "text_aware" for self, "text_aware_neighbour" for neighbour, "text_aware-mask_loss" for self with MASK loss,
    "text_aware_neighbour-mask_both". Runs of another pairing or mask never overwrite each other."""
    return (variant if pairing == "self" else f"{variant}_{pairing}") + ("" if mask == "none" else f"-mask_{mask}")


@dataclass
class Pairs:
    """The reference of every training row (rows in the feature cache's order).

    reference[i]:  row of target i's reference in the cache (mirror: i itself, used mirrored)
    similarity[i]: cosine between the centred CLS features of target i and its reference
    mirror_embeds: (N, 257, 1280) features of the flipped images (mirror pairing only; not saved in pairs.json)
    """

    pairing: str
    self_prob: float
    ids: list[str]
    reference: list[int]
    similarity: list[float]
    cache_fingerprint: str
    rule: str = ""
    mirror_embeds: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def self_mask(self, n: int, *, seed: int, step: int, process: int = 0) -> torch.Tensor:
        """(n,) bool: which samples of this process's batch at `step` keep their own features. Depends only on
        (seed, step, process): numpy's SeedSequence over them, apart from the step's noise generator."""
        rng = np.random.default_rng([seed % 2**63, step, process, _STREAM])
        return torch.from_numpy(rng.random(n) < self.self_prob)

    def references(self, features: dict[str, torch.Tensor], rows: torch.Tensor, *, seed: int, step: int,
                   process: int = 0) -> torch.Tensor:
        """The image features each target of `rows` is conditioned on at `step`: (B, 257, 1280), the cache's dtype.
        rows: (B,) cache rows (targets)."""
        own = features["image_embeds"][rows]
        if self.pairing == "mirror":
            other = self.mirror_embeds[rows]
        else:
            other = features["image_embeds"][torch.as_tensor(self.reference)[rows]]
        keep = self.self_mask(len(rows), seed=seed, step=step, process=process)
        return torch.where(keep[:, None, None], own, other)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in _SAVED}
        return {"format": "ipa-pairs", **d, "reference_ids": [self.ids[j] for j in self.reference]}

    @classmethod
    def from_json(cls, d: dict) -> "Pairs":
        return cls(**{k: d[k] for k in _SAVED})

    def describe(self) -> str:
        """One line: the rule, the spread of similarities, the self mix."""
        s = np.asarray(self.similarity)
        return (f"{self.pairing} pairing of {len(self.ids)} training drawings ({self.rule}); cosine similarity "
                f"min {s.min():.2f}, median {np.median(s):.2f}, max {s.max():.2f}; {self.self_prob:.0%} of samples "
                "keep their own image (self)")


def cls_features(image_embeds: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) unit vectors: the CLS token of penultimate hidden states (N, T, D), in fp32, minus `mean`
    (default: their own mean over N), L2-normalised."""
    cls = image_embeds[:, 0].float()
    cls = cls - (cls.mean(0) if mean is None else mean)
    return torch.nn.functional.normalize(cls, dim=-1)


def nearest_outside_group(unit: torch.Tensor, groups, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of unit (N, D) (unit vectors), the row with the highest cosine among rows of another group.
    Returns (index (N,) long, cosine (N,) float); ties go to the lower index. Rows in chunks to bound memory."""
    groups = torch.as_tensor(np.asarray(list(groups)))
    if len(groups) and (groups == groups[0]).all():
        raise PairingError(f"all {len(groups)} training drawings are in one near-duplicate group: no row has a "
                           "neighbour outside its group. Use pairing 'self' or 'mirror', or add drawings.")
    index, cosine = [], []
    for s in range(0, len(unit), chunk):
        sim = unit[s:s + chunk] @ unit.T  # (chunk, N)
        sim[groups[s:s + chunk, None] == groups[None, :]] = -math.inf  # own group (and self) excluded
        best = sim.max(dim=1)
        index.append(best.indices)
        cosine.append(best.values)
    return torch.cat(index), torch.cat(cosine)


def make_pairs(pairing: str, features: dict[str, torch.Tensor], cache_meta: dict, ids, groups, *,
               self_prob: float | None = None, mirror_embeds: torch.Tensor | None = None) -> Pairs:
    """Pairs for `pairing` ("mirror" or "neighbour") from the feature cache (helpers.data.features).

    features:      the cache's tensors (image_embeds (N, 257, 1280)); cache_meta its metadata
    ids, groups:   the training split's id and group columns, in the cache's row order (checked against it)
    self_prob:     fraction of samples that keep their own features (None: DEFAULT_SELF_PROB)
    mirror_embeds: (N, 257, 1280) mirror_image_embeds of cache_mirror_features; required for "mirror"
    """
    if pairing not in ("mirror", "neighbour"):
        raise PairingError(f"make_pairs: pairing must be 'mirror' or 'neighbour' (self needs no pairs), not {pairing!r}")
    self_prob = DEFAULT_SELF_PROB if self_prob is None else float(self_prob)
    if not 0 <= self_prob <= 1:
        raise PairingError(f"the self-pairing probability must lie in [0, 1], got {self_prob}")
    ids = list(ids)
    if json.loads(cache_meta.get("ids", "[]")) != ids:
        raise PairingError("the feature cache's rows are not the training split's (ids differ): rebuild the cache "
                           "with helpers.data.features.prepare_for_training on the same data folder")
    embeds = features["image_embeds"]
    mean = embeds[:, 0].float().mean(0)
    unit = cls_features(embeds, mean)
    if pairing == "mirror":
        if mirror_embeds is None or mirror_embeds.shape != embeds.shape:
            raise PairingError("mirror pairing needs the mirror features of this cache "
                               "(helpers.data.features.cache_mirror_features), shaped like its image_embeds")
        reference = torch.arange(len(ids))
        similarity = (unit * cls_features(mirror_embeds, mean)).sum(-1)
    else:
        reference, similarity = nearest_outside_group(unit, groups)
    return Pairs(pairing, self_prob, ids, reference.tolist(), [round(float(s), 6) for s in similarity],
                 cache_meta.get("fingerprint", ""), RULES[pairing], mirror_embeds if pairing == "mirror" else None)


def save_pairs(pairs: Pairs, run_dir) -> Path:
    """Write run_dir/pairs.json (atomically). Returns its path."""
    return write_json(Path(run_dir) / PAIRS_FILE, pairs.to_json())


def load_pairs(run_dir) -> Pairs:
    """The pairs a run saved (run_dir/pairs.json)."""
    path = Path(run_dir) / PAIRS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PairingError(f"{path}: cannot read the run's pairs ({e})") from None
    if data.get("format") != "ipa-pairs":
        raise PairingError(f"{path}: not a pairs file written by helpers.train.pairing")
    return Pairs.from_json(data)


def run_pairs(pairing: str, self_prob: float | None, run_dir, profile, prep, cache_path, features, cache_meta, *,
              write: bool = True, progress: bool = True) -> Pairs | None:
    """The pairs of a training run in run_dir (None for self pairing), for helpers.train.

    A fresh run makes them from the cache (mirror: building the mirror features first) and, if `write`,
    saves them to run_dir/pairs.json. A run with checkpoints reads pairs.json back, after checking that it
    was made with this pairing, probability and feature cache. A folder trained with another pairing
    raises PairingError naming it, so one pairing never resumes another's checkpoints.
    """
    if pairing not in PAIRINGS:
        raise PairingError(f"unknown pairing {pairing!r}: choose one of {', '.join(PAIRINGS)}")
    run_dir = Path(run_dir)
    saved = run_dir / PAIRS_FILE
    resuming = bool(list_checkpoints(run_dir))
    if pairing == "self":
        if saved.is_file() and resuming:
            raise PairingError(f"{run_dir} holds checkpoints of a run with {load_pairs(run_dir).pairing} pairing "
                               f"({PAIRS_FILE}); self pairing would resume them. Use another output folder "
                               f"(self-paired runs go to runs/<variant>), or delete this one to start afresh.")
        if saved.is_file() and write:
            saved.unlink()  # left by a run that never reached a checkpoint
        return None
    mirror = None
    if pairing == "mirror":
        from safetensors.torch import load_file

        path = cache_mirror_features(prep.train, cache_path, base_model=profile.base_model,
                                     ip_adapter=profile.ip_adapter, image_encoder=profile.image_encoder,
                                     resolution=profile.resolution, batch_size=profile.feature_batch_size,
                                     progress=progress)
        mirror = load_file(str(path))["mirror_image_embeds"]
    fresh = make_pairs(pairing, features, cache_meta, list(prep.train["id"]), list(prep.train["group"]), self_prob=self_prob,
                       mirror_embeds=mirror)
    if not resuming:
        if write:
            save_pairs(fresh, run_dir)
        return fresh
    if not saved.is_file():
        raise PairingError(f"{run_dir} holds checkpoints of a self-paired run (no {PAIRS_FILE}); {pairing} pairing "
                           f"would resume them. Train it into {run_dir.parent / f'{run_dir.name}_{pairing}'} "
                           "(runs/<variant>_<pairing>), or delete this folder to start afresh.")
    old = load_pairs(run_dir)
    for what, a, b in (("pairing", old.pairing, fresh.pairing), ("self probability", old.self_prob, fresh.self_prob),
                       ("feature cache", old.cache_fingerprint, fresh.cache_fingerprint)):
        if a != b:
            raise PairingError(f"{saved}: this run was trained with {what} {a!r}, not {b!r}; resuming would mix "
                               "the two. Keep the run's settings, or use another output folder.")
    old.mirror_embeds = mirror
    return old


# --------------------------------------------------------------------------------------------------
# Looking at the pairs (notebook 03)
# --------------------------------------------------------------------------------------------------


def example_rows(pairs: Pairs, n: int = 8) -> list[int]:
    """n target rows spread over the similarity range, weakest pair first (where the rule fails, if anywhere)."""
    order = np.argsort(np.asarray(pairs.similarity), kind="stable")
    picks = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
    return [int(order[k]) for k in picks]


def pair_table(pairs: Pairs, split, rows=None) -> list[dict]:
    """One dict per target row (default: every row): ids, groups, cosine, both captions. split: the training split."""
    rows = range(len(pairs.ids)) if rows is None else rows
    text, group = list(split["text"]), list(split["group"])
    return [{"target": pairs.ids[i], "reference": pairs.ids[pairs.reference[i]] + (" (mirrored)" if pairs.pairing == "mirror" else ""),
             "cosine": round(pairs.similarity[i], 3), "target group": group[i], "reference group": group[pairs.reference[i]],
             "target caption": text[i], "reference caption": text[pairs.reference[i]]} for i in rows]


def show_pairs(pairs: Pairs, split, rows=None, *, n: int = 8, title: str | None = None):
    """A matplotlib Figure: for each target row (default: example_rows(pairs, n)), the target drawing and its
    reference side by side, with captions and their cosine similarity; two pairs per line."""
    import matplotlib.pyplot as plt
    from PIL import ImageOps

    rows = example_rows(pairs, n) if rows is None else list(rows)
    lines = math.ceil(len(rows) / 2)
    fig, axes = plt.subplots(lines, 4, figsize=(11, 3.3 * lines), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(rows):
        j = pairs.reference[i]
        target, reference = split[i], split[j]
        ref_image = ImageOps.mirror(reference["image"]) if pairs.pairing == "mirror" else reference["image"]
        left, right = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
        left.imshow(target["image"])
        left.set_title(f"target {target['id']}\n" + textwrap.fill(target["text"], 30), fontsize=7)
        right.imshow(ref_image)
        right.set_title(f"reference {reference['id']}{' mirrored' if pairs.pairing == 'mirror' else ''}, "
                        f"cos {pairs.similarity[i]:.2f}\n" + textwrap.fill(reference["text"], 30), fontsize=7)
    fig.suptitle(title or f"{pairs.pairing} pairing: target | reference, weakest pair first", fontsize=10)
    return fig
