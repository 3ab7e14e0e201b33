"""Near duplicates and the split that keeps them together: dHash of an image and of its mirror,
union-find over small Hamming distances, whole groups to one side.

The Rick and Morty dataset holds a horizontally mirrored copy of each drawing. Each image gets a 256-bit
difference hash (dHash) of itself and of its mirror; images whose hashes (either way round) differ in at most
`max_distance` bits share a group (union-find), and `split_by_group` assigns whole groups, so no test image
has its mirror or near-duplicate in training.

    hashes, distance = hash_distances(images)          # (N, 256) bool, (N, N) int
    groups = near_duplicate_groups(distance)           # (N,) int
    is_test = split_by_group(groups, 0.1, seed=0)      # (N,) bool
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .sources import DataSourceError

HASH_SIZE = 16  # dHash grid: 16 x 16 = 256 bits
MAX_HASH_DISTANCE = 6  # bits; JPEG re-encoding and rescaling move a 256-bit dHash by <= 3 bits


def dhash(im: Image.Image, hash_size: int = HASH_SIZE) -> np.ndarray:
    """Difference hash: greyscale, resized to (hash_size + 1) x hash_size, one bit per horizontally adjacent
    pair (is the right pixel brighter?). Returns a bool array of hash_size**2 bits. Robust to re-encoding
    and rescaling; a mirrored image has a different hash, so hash the mirror too (see near_duplicate_groups)."""
    g = np.asarray(im.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.float32)
    return (g[:, 1:] > g[:, :-1]).ravel()


def hash_distances(images: Sequence[Image.Image], hash_size: int = HASH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, distance): hashes (N, hash_size**2) bool; distance (N, N) int, symmetric: the smallest Hamming
    distance between image i and image j with either one mirrored or neither (so an exact mirror pair is at 0).
    A mirror's dHash is not the original's bits reversed, so |h_i ^ m_j| and |m_i ^ h_j| differ: both count."""
    hashes = np.stack([dhash(im, hash_size) for im in images]) if images else np.zeros((0, hash_size**2), bool)
    flipped = np.stack([dhash(ImageOps.mirror(im), hash_size) for im in images]) if images else hashes
    distance = _hamming_min(hashes, flipped)
    return hashes, np.minimum(distance, distance.T)


def _hamming_min(hashes: np.ndarray, flipped: np.ndarray, chunk: int = 1024) -> np.ndarray:
    # On +-1 vectors a . b = agreements - disagreements = bits - 2 * distance; rows in chunks to bound memory
    a = hashes.astype(np.float32) * 2 - 1  # (N, B)
    f = flipped.astype(np.float32) * 2 - 1
    bits = hashes.shape[1]
    out = np.empty((len(a), len(a)), dtype=np.int32)
    for s in range(0, len(a), chunk):
        same = np.maximum(a[s:s + chunk] @ a.T, a[s:s + chunk] @ f.T)  # agreements - disagreements
        out[s:s + chunk] = np.rint((bits - same) / 2).astype(np.int32)
    return out


def near_duplicate_groups(distance: np.ndarray, max_distance: int = MAX_HASH_DISTANCE) -> np.ndarray:
    """Union-find over pairs with distance <= max_distance. Returns (N,) int group labels, numbered
    0, 1, ... in order of first appearance."""
    n = len(distance)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(distance <= max_distance, k=1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(n)]
    label = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return np.array([label[r] for r in roots], dtype=np.int64)


def split_by_group(groups: Sequence[int], test_fraction: float, seed: int = 0) -> np.ndarray:
    """(N,) bool, True for test rows. Whole groups go to test, in a seeded random order, until the test
    split holds round(test_fraction * N) rows (groups that would overshoot are passed over; if none fits,
    the smallest one is taken)."""
    groups = np.asarray(groups)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    is_test = np.zeros(len(groups), dtype=bool)
    if test_fraction == 0 or len(groups) == 0:
        return is_test
    labels, sizes = np.unique(groups, return_counts=True)
    if len(labels) < 2:
        raise DataSourceError(f"all {len(groups)} images are near-duplicates of each other (one group): "
                              "there is nothing to hold out without leakage")
    target = max(1, round(test_fraction * len(groups)))
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen, count = [], 0
    for k in order:
        if count + sizes[k] <= target:
            chosen.append(labels[k])
            count += sizes[k]
    if not chosen:
        chosen = [labels[min(order, key=lambda k: sizes[k])]]
    is_test[np.isin(groups, chosen)] = True
    return is_test
