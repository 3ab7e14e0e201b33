"""helpers.sample.gallery: grids hold what their labels say; a gallery shared by a launch's processes is the one
one process makes."""
import pickle
from pathlib import Path

import numpy as np
import pytest
from _gallery_launch import MODELS, gallery
from _launch import one_test_part, torchrun
from _samples import fake_samples

from helpers.sample.gallery import image_grid


def test_grid_has_the_right_size_labels_and_thumbnails():
    samples = fake_samples()
    grid = image_grid(samples, rows="reference", cols=("model", "scale"), cell=100, label_width=120,
                               title="tiny")
    assert grid.info["rows"] == ["a", "b"]
    assert grid.info["cols"] == ["pretrained\nscale 0.5", "pretrained\nscale 1", "finetuned-vanilla\nscale 0.5",
                                 "finetuned-vanilla\nscale 1"]
    header = grid.height - 2 * 100
    assert grid.width == 120 + 100 * (1 + 4) and header > 0
    assert grid.getpixel((120 + 50, header + 150)) == (200, 10, 0)  # row 2 starts with reference b's thumbnail
    assert grid.getpixel((120 + 100 + 50, header + 50)) == (0, 50, 50)  # then scale 0.5, scale 1
    assert grid.getpixel((120 + 200 + 50, header + 50)) == (0, 100, 50)
    assert np.asarray(grid.crop((0, header, 120, grid.height))).min() < 128  # row labels were drawn
    assert np.asarray(grid.crop((220, 0, grid.width, header))).min() < 128  # column labels were drawn
    with pytest.raises(ValueError, match="share the cell.*scale"):
        image_grid(samples, rows="reference", cols="model")


@one_test_part
def test_a_gallery_made_by_two_processes_is_the_one_made_alone(tmp_path):
    """generate_shared under torchrun (2 CPU processes): the 12 jobs (2 models x 2 scales x 3 references) dealt
    out, one call of generate each, and every process gets back all 48 images in generate's order."""
    calls, alone = gallery()
    assert len(calls) == 1 and len(alone) == 48  # alone: generate itself, once
    torchrun(Path(__file__).with_name("_gallery_launch.py"), tmp_path)
    got = [pickle.loads((tmp_path / f"rank-{k}.pkl").read_bytes()) for k in (0, 1)]
    jobs = [([m], (s,), [r]) for m in MODELS for s in (0.5, 1.0) for r in "abc"]
    assert [got[0][0], got[1][0]] == [jobs[0::2], jobs[1::2]]
    assert got[0][1] == got[1][1] == alone
