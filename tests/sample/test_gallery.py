"""helpers.sample.gallery: grids hold what their labels say."""
import numpy as np
import pytest
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
