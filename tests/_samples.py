"""Test support: hand-made Samples (no generation), and images as integer arrays."""
import numpy as np
from PIL import Image

from helpers.sample.generate import Sample


def fake_samples(models=("pretrained", "finetuned-vanilla"), scales=(0.5, 1.0), refs=("a", "b"), size=64):
    ref_images = {r: Image.new("RGB", (size, size), (200, 10 * i, 0)) for i, r in enumerate(refs)}
    out = []
    for m in models:
        for sc in scales:
            for r in refs:
                out.append(Sample(Image.new("RGB", (size, size), (0, int(100 * sc), 50)), m, r, "a cartoon drawing",
                                  sc, 0, 4, 7.5, resolution=size, variant="vanilla", profile="tiny",
                                  reference_image=ref_images[r]))
    return out


def pixels(image):
    return np.asarray(image).astype(int)
