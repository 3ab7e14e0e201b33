"""A gallery made with helpers.sample.gallery.generate_shared and a stand-in generate (tests/_grid.py), alone or,
run as a script in every process of a launch, writing what this process was asked to make and what it got
back to OUT/rank-K.pkl.    _gallery_launch.py OUT"""
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for _grid
from _grid import fake_generate, identities  # noqa: E402
from PIL import Image  # noqa: E402

from helpers.sample.gallery import generate_shared  # noqa: E402

MODELS = ["pretrained", "finetuned-vanilla"]


def gallery():
    """(the calls of generate: (models, scales, references)), the samples as comparable tuples)."""
    calls = []

    def generate(bank, references, prompts, **kw):
        calls.append((kw["models"], kw["scales"], list(references)))
        return fake_generate(bank, references, prompts, **kw)

    refs = {r: Image.new("RGB", (32, 32), colour) for r, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)),
                                                                    ("c", (0, 0, 200)))}
    prompts = {r: ["a drawing", "a drawing at night"] for r in refs}
    samples = generate_shared(identities(MODELS), refs, prompts, models=MODELS,
                              scales=(0.5, 1.0), seeds=(0, 1), generate=generate)
    return calls, [(s.model, s.scale, s.reference, s.prompt, s.seed, s.image.tobytes()) for s in samples]


if __name__ == "__main__":
    with open(Path(sys.argv[1]) / f"rank-{os.environ['RANK']}.pkl", "wb") as f:
        pickle.dump(gallery(), f)
