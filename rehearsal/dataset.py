"""The mirror's dataset repo: synthetic drawings in the layout of Norod78/RickAndMorty-HorizontalMirror-blip-captions.

What the real repo holds (its Hub page): README.md (dataset card with `dataset_info` YAML; 529 rows,
cc-by-nc-sa-4.0, text-to-image, English) and one Parquet file, data/train-00000-of-00001-<16 hex>.parquet,
with columns `image` (datasets.Image: a struct of `bytes` and `path`) and `text` (a BLIP caption), where
every drawing comes with its horizontal mirror.

What the mirror holds: the same layout and columns, with N_PAIRS drawings by helpers.tiny's procedural
cartoon drawer (PNG, SIZE x SIZE) and their mirrors, shuffled, captioned in BLIP's style. Few rows keep the
rehearsal fast; the real image size could not be checked offline (see SIZE).
"""

from __future__ import annotations

import random

from .hub_cache import RepoWriter

REPO_ID = "Norod78/RickAndMorty-HorizontalMirror-blip-captions"
PARQUET = "data/train-00000-of-00001-ba779140d6f19bf6.parquet"  # the published file name
N_PAIRS = 20  # 40 rows (the real dataset: 529). Not fewer: a 10% test split must hold 2 pairs (notebook 05
# compares a test drawing with one of another group, and the quick run evaluates 2 held-out references)
SIZE = 512  # pixels; the real images' size is not on the dataset card: 512 is the size the project trains at

CARD = """---
license: cc-by-nc-sa-4.0
task_categories:
- text-to-image
language:
- en
size_categories:
- n<1K
dataset_info:
  features:
  - name: image
    dtype: image
  - name: text
    dtype: string
  splits:
  - name: train
    num_bytes: {num_bytes}
    num_examples: {num_examples}
  download_size: {download_size}
  dataset_size: {num_bytes}
---
# Rehearsal mirror of Norod78/RickAndMorty-HorizontalMirror-blip-captions

SYNTHETIC: {num_examples} procedurally drawn cartoon characters ({n_pairs} drawings and their horizontal
mirrors), {size} x {size} PNG, with BLIP-style captions. Same repo id, layout and columns as the real
dataset; none of its images.
"""


def _rows():
    """(PIL image, caption, file name) for N_PAIRS drawings and their mirrors, shuffled as a Hub upload is."""
    from PIL import ImageOps

    from helpers.tiny.cartoons import (
        CHARACTERS,
        POSES,
        SCENES,
        cartoon_caption,
        draw_character,
    )

    combos = [(c, p) for p in range(len(POSES)) for c in range(len(CHARACTERS))][:N_PAIRS]
    rows = []
    for n, (c, p) in enumerate(combos):
        scene = (c + p) % len(SCENES)
        im = draw_character(c, POSES[p], scene, size=SIZE)
        text = cartoon_caption(c, POSES[p], scene)
        rows += [(im, text, f"{n:04d}.png"), (ImageOps.mirror(im), text, f"{n:04d}_mirror.png")]
    random.Random(0).shuffle(rows)
    return rows


def build_dataset(repo: RepoWriter) -> int:
    """Write README.md and the Parquet file into the repo's snapshot; returns the row count."""
    import io

    import datasets

    rows = _rows()

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(im), "path": name} for im, _, name in rows], "text": [t for _, t, _ in rows]},
        features=features)
    path = repo.path(PARQUET)
    ds.to_parquet(str(path))
    repo.write_bytes("README.md", CARD.format(
        num_bytes=ds.data.nbytes, num_examples=len(ds), download_size=path.stat().st_size, n_pairs=N_PAIRS,
        size=SIZE).encode())
    return len(ds)
