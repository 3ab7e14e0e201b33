"""Test support for helpers.evaluate.grid: a stand-in for generation (no diffusion), interruptions, the tiny split
and a small grid over them."""
import pytest
from PIL import Image

from helpers.evaluate.grid import run_grid
from helpers.evaluate.protocol import build_prompts
from helpers.sample.generate import Sample
from helpers.sample.references import pick_references
from helpers.sample.registry import MODEL_NAMES

EDITS = {"setting": ["a cartoon character on a beach", "a cartoon character in a forest at night"],
         "outfit": ["a cartoon character wearing a red hat", "a cartoon character wearing a black coat"],
         "action": ["a cartoon character dancing", "a cartoon character eating"],
         "style": ["a watercolor painting of a character", "a pixel art character"]}


def identities(models, tag="a"):
    """A stand-in bank for run_grid: {model: adapter identity}; another tag stands for retrained weights."""
    return {m: f"{tag}{i:015x}" for i, m in enumerate(models)}


def fake_generate(bank, references, prompts, *, models=None, scales=(1.0,), seeds=(0,), steps=2, guidance=7.5,
                  **kwargs):
    """Like helpers.sample.generate.generate: models x scales x references x prompts x seeds, in that order.
    The "image" is the reference blended towards grey, more so at low scale, tinted per model, seed and weights
    (bank: {model: identity}, as identities() makes, or a ModelBank)."""
    out = []
    for m in models or bank:
        ident = bank.adapter_sha256(m) if hasattr(bank, "adapter_sha256") else bank[m]
        tint = (37 * len(m) % 100, 50 + int(ident[-4:], 16) % 100, 17 * (MODEL_NAMES.index(m) if m in MODEL_NAMES else 5))
        for s in scales:
            for r, image in references.items():
                grey = Image.new("RGB", image.size, tint)
                for p in prompts[r]:
                    for seed in seeds:
                        blended = Image.blend(grey, image, s * (1 - 0.1 * seed) * (0.8 + 0.05 * (len(p) % 4)))
                        out.append(Sample(blended, m, r, p, s, seed, steps, guidance, adapter_sha256=ident))
    return out


class Interrupted(RuntimeError):
    pass


def interrupted_after(n_images):
    """fake_generate that raises once it has made n_images (a disconnect in the middle of the grid)."""
    made = []

    def generate(*args, **kwargs):
        if len(made) >= n_images:
            raise Interrupted(f"stopped after {len(made)} images")
        out = fake_generate(*args, **kwargs)
        made.extend(out)
        return out

    generate.made = made
    return generate


@pytest.fixture(scope="module")
def split(tiny_profile, tmp_path_factory):
    """Notebook 01's leak-free split of the tiny dataset (helpers.data), as lists of rows."""
    from helpers.data.prepare import prepare_dataset

    prep = prepare_dataset(tiny_profile.dataset, tmp_path_factory.mktemp("data"), resolution=tiny_profile.resolution,
                           test_fraction=tiny_profile.test_fraction, seed=0, progress=False)
    return [prep.train[i] for i in range(len(prep.train))], [prep.test[i] for i in range(len(prep.test))]


def grid(split, tiny_profile, out_dir, generate=fake_generate, models=MODEL_NAMES, bank=None, **kw):
    """3 references x (own caption + 1 edit) x 2 scales x 2 seeds for `models`, with the stand-in."""
    train, test = split
    refs = pick_references(test, 3)
    specs = build_prompts(refs, EDITS, 1)
    result = run_grid(bank or identities(models), refs, specs, train=train, scales=(0.5, 1.0), seeds=(0, 1),
                      out_dir=out_dir, clip=tiny_profile.eval_clip, dino=tiny_profile.dino,
                      segmenter=tiny_profile.segmenter, mask_threshold=tiny_profile.mask_threshold, steps=2, guidance=7.5,
                      generate=generate, progress=False, models=list(models), **kw)
    return result, refs, specs
