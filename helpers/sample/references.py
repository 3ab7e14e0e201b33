"""Held-out references: one rule for choosing them (notebooks 02 to 05), from notebook 01's test split.

    refs, where = held_out_references(profile, data_dir, n=4)   # {id: PIL image} (.captions too) and a sentence
    chosen = pick_references(prep.test, n=15, seed=0)           # one per near-duplicate group, seeded

One per near-duplicate group, so a mirrored copy never counts as a second reference; the groups are drawn at
random with a seed and returned in a stable order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.prepare import use_prepared
from ..data.prepared_folder import PREPARED_JSON


@dataclass
class Reference:
    """One held-out reference image with its own caption."""

    id: str
    image: Image.Image = field(repr=False)
    caption: str
    group: str = ""  # near-duplicate group from helpers.data (mirrored copies share one)


def column(ds, name: str, default=None) -> list | None:
    """A column of a datasets.Dataset (or list of dicts) as a list; if it is absent: [default(i) for each
    row] when a default is given, else None."""
    names = getattr(ds, "column_names", None) or (list(ds[0].keys()) if len(ds) else [])
    if name in names:
        return list(ds[name]) if hasattr(ds, "column_names") else [row[name] for row in ds]
    return None if default is None else [default(i) for i in range(len(ds))]


def pick_references(test, n: int, *, seed: int = 0) -> list[Reference]:
    """Up to n references from a test split (columns image, text, and group / id when present): one per
    group, so that a mirrored copy never counts as a second reference; groups chosen at random (seeded),
    returned in a stable order. Fewer than n when the split has fewer groups."""
    if n < 1:
        raise ValueError(f"need at least one reference, got n={n}")
    ids = [str(i) for i in column(test, "id", default=lambda i: f"test{i}")]
    groups = [str(g) for g in column(test, "group", default=lambda i: ids[i])]
    first: dict[str, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    order = sorted(first)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(order))[:n].tolist())
    rows = [first[order[k]] for k in chosen]
    return [Reference(ids[i], test[i]["image"].convert("RGB"), str(test[i]["text"]), groups[i]) for i in rows]


class References(dict):
    """{id: PIL image} of held-out references, and `captions` {id: the reference's own caption}."""

    def __init__(self, references: list[Reference]):
        super().__init__((r.id, r.image) for r in references)
        self.captions = {r.id: r.caption for r in references}


def held_out_references(profile, data_dir, n: int = 4, *, seed: int = 0) -> tuple[References, str]:
    """Up to n held-out reference images {id: PIL image} (a `References` dict, whose `.captions` holds their
    captions), picked by `pick_references` (one per near-duplicate group, seeded), from notebook 01's test
    split in data_dir, and a sentence saying where they came from.

    The data is read as notebook 01 prepared it, whatever its source (helpers.data.prepare.use_prepared); if data_dir
    holds no prepared data yet, it is prepared here from the profile's dataset as notebook 01 does.
    """
    data_dir = Path(data_dir)
    had = (data_dir / PREPARED_JSON).is_file()
    prep = use_prepared(data_dir, profile, announce=False, progress=False)
    where = (f"the test split notebook 01 wrote in {data_dir}" if had
             else f"the test split, prepared now in {data_dir} as notebook 01 does (it had not run)")
    test = prep.test
    if len(test) == 0:
        raise ValueError(f"{data_dir}: the test split is empty (test_fraction={prep.info.get('test_fraction')}); "
                         "prepare the data with a test_fraction above 0")
    refs = pick_references(test, n, seed=seed)
    return References(refs), f"{len(refs)} held-out references (one per group) from {where}"
