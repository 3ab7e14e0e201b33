"""helpers.tiny.cartoons: each drawing's true mask (the oracle) covers its character and nothing of the scene, and
the rows it gives are the dataset's."""
import datasets
import numpy as np

from helpers.tiny.cartoons import CHARACTERS, POSES, SCENES, cartoon_rows, draw_character, draw_character_and_mask


def test_the_oracle_mask_is_the_character_and_only_it():
    for c in range(len(CHARACTERS)):
        for p, pose in enumerate(POSES):
            scene = (c + p) % len(SCENES)
            image, mask = draw_character_and_mask(c, pose, scene, 64)
            pixels, on = np.asarray(image).astype(int), np.asarray(mask) == 255
            assert np.array_equal(np.asarray(image), np.asarray(draw_character(c, pose, scene, 64)))
            assert set(np.unique(np.asarray(mask))) == {0, 255} and 0.1 < on.mean() < 0.5
            sun = (250, 230, 90) if scene != 2 else (230, 230, 230)
            scenery = (pixels == SCENES[scene][1]).all(-1) | (pixels == sun).all(-1)
            assert scenery[~on].all()  # off the mask: sky, grass or space, and the sun or moon
            assert not scenery[on].all()  # on it: the character's colours


def test_the_rows_are_the_datasets_in_its_order(tiny_root):
    ds = datasets.load_dataset(str(tiny_root / "dataset"), split="train")
    rows = cartoon_rows(128)
    assert len(rows) == len(ds) and [t for _, t, _ in rows] == ds["text"]
    for (image, _, mask), stored in zip(rows, ds["image"]):
        assert np.array_equal(np.asarray(image), np.asarray(stored)) and mask.size == image.size
