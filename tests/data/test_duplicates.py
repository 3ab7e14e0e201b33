"""helpers.data.duplicates: hashes find mirrors and near-duplicates, and the split never separates a group."""
import io

import datasets
import numpy as np
from PIL import Image, ImageOps

from helpers.data.duplicates import MAX_HASH_DISTANCE, hash_distances, split_by_group
from helpers.tiny.cartoons import draw_character


def png_bytes(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_hashes_find_mirrors_and_near_duplicates_but_not_other_drawings():
    im = draw_character(0, "standing", 0)
    jpeg = Image.open(io.BytesIO(png_bytes(im.resize((100, 100)), "JPEG", quality=60))).convert("RGB")
    other = draw_character(3, "waving", 2)
    _, d = hash_distances([im, ImageOps.mirror(im), jpeg, other])
    assert d[0, 1] == 0 and d[1, 0] == 0  # an exact mirror
    assert d[0, 2] <= MAX_HASH_DISTANCE  # re-encoded and rescaled
    assert d[0, 3] > MAX_HASH_DISTANCE and d[1, 3] > MAX_HASH_DISTANCE


def test_split_never_separates_a_mirror_pair(tiny_profile, tiny_data):
    prep = tiny_data[0]
    raw = datasets.load_dataset(tiny_profile.dataset, split="train")
    arrays = [np.asarray(im.convert("RGB")) for im in raw["image"]]
    pairs = [(i, j) for i in range(len(arrays)) for j in range(i + 1, len(arrays))
             if np.array_equal(arrays[i], arrays[j][:, ::-1])]
    assert len(pairs) == len(arrays) // 2  # the tiny dataset is all mirror pairs
    side = {id_: "train" for id_ in prep.train["id"]} | {id_: "test" for id_ in prep.test["id"]}
    group = dict(zip(list(prep.train["id"]) + list(prep.test["id"]), list(prep.train["group"]) + list(prep.test["group"])))
    for i, j in pairs:
        a, b = f"row-{i:05d}", f"row-{j:05d}"
        assert side[a] == side[b], f"mirror pair {a}, {b} is split"
        assert group[a] == group[b]
    assert not set(prep.train["group"]) & set(prep.test["group"])
    assert len(prep.test) > 0 and abs(len(prep.test) - tiny_profile.test_fraction * len(arrays)) <= 4
    assert len(set(group.values())) >= len(pairs) // 2  # grouping found pairs, not one big blob
    # any seed: whole groups only
    groups = np.array(list(group.values()))
    for seed in range(20):
        is_test = split_by_group(groups, 0.25, seed)
        assert not set(groups[is_test]) & set(groups[~is_test]) and is_test.any() and not is_test.all()


def test_distances_are_symmetric_so_groups_do_not_depend_on_row_order():
    """A mirror's dHash is not the original's bits reversed: with only j mirrored, d(i, j) != d(j, i) in general.
    The distance takes either image mirrored, so it is symmetric and the groups are the same in any order."""
    from helpers.data.duplicates import dhash, near_duplicate_groups

    images = [draw_character(c, pose, c % 3) for c in range(4) for pose in ("standing", "waving")]
    images += [ImageOps.mirror(im) for im in images[::3]]
    hashes, d = hash_distances(images)
    assert np.array_equal(d, d.T)
    one_way = np.array([[(dhash(a) != dhash(ImageOps.mirror(b))).sum() for b in images] for a in images])
    assert (one_way != one_way.T).any()  # the asymmetry the symmetric distance removes
    order = np.random.default_rng(0).permutation(len(images))
    _, d_shuffled = hash_distances([images[i] for i in order])
    groups, shuffled = near_duplicate_groups(d), near_duplicate_groups(d_shuffled)
    same = lambda g: {frozenset(np.flatnonzero(g == k)) for k in set(g)}  # noqa: E731  (the partition)
    assert same(groups) == {frozenset(order[list(s)]) for s in same(shuffled)}
