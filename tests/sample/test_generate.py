"""helpers.sample.generate: deterministic batched generation, and held-out references from the test split."""
import numpy as np
import torch
import pytest
from _samples import pixels
from PIL import Image

from helpers.sample.generate import generate, pick_batch_size
from helpers.sample.references import held_out_references

STEPS = 2


@pytest.fixture(scope="module")
def references(reference_image):
    return {"ref": reference_image, "flipped": reference_image.transpose(Image.FLIP_LEFT_RIGHT)}


def test_same_seed_same_image_different_seeds_differ_batching_does_not_matter(bank, references):
    kwargs = dict(models=["finetuned-text-aware"], seeds=(0, 1), steps=STEPS, progress=False)
    one = generate(bank, references, ["a cat", "a robot"], batch_size=1, **kwargs)
    again = generate(bank, references, ["a cat", "a robot"], batch_size=1, **kwargs)
    batched = generate(bank, references, ["a cat", "a robot"], batch_size=3, **kwargs)
    order = [(s.reference, s.prompt, s.seed) for s in one]
    assert order == [(r, p, s) for r in references for p in ["a cat", "a robot"] for s in (0, 1)]
    assert [(s.reference, s.prompt, s.seed) for s in batched] == order
    for a, b, c in zip(one, again, batched):
        assert np.array_equal(pixels(a.image), pixels(b.image))  # same seed, same image
        assert np.abs(pixels(a.image) - pixels(c.image)).max() <= 2  # batch of 3: float rounding only
    assert np.abs(pixels(one[0].image) - pixels(one[1].image)).mean() > 5  # seeds 0 and 1 differ
    s = one[0]
    assert (s.model, s.steps, s.guidance, s.scale, s.variant, s.image.size) == (
        "finetuned-text-aware", STEPS, bank.profile.guidance_scale, 1.0, "text_aware", (64, 64))


def test_at_scale_zero_every_model_is_plain_stable_diffusion(bank, reference_image):
    out = generate(bank, {"r": reference_image}, ["a cat"], scales=(0.0,), steps=STEPS, progress=False)
    assert len(out) == len(bank.names) == 7 and all(np.array_equal(pixels(s.image), pixels(out[0].image)) for s in out)


def test_per_reference_prompts_and_progress_callback(bank, references):
    calls = []
    out = generate(bank, references, {"ref": ["a cat"], "flipped": ["a dog", "a robot"]},
                            models=["pretrained"], steps=STEPS, progress=lambda done, total: calls.append((done, total)))
    assert [(s.reference, s.prompt) for s in out] == [("ref", "a cat"), ("flipped", "a dog"), ("flipped", "a robot")]
    assert calls[-1] == (3, 3)
    with pytest.raises(KeyError, match="unknown references"):
        generate(bank, references, {"nope": ["a cat"]}, progress=False)
    with pytest.raises(KeyError, match="not available"):
        generate(bank, references, ["a cat"], models=["finetuned-lora"], progress=False)


def test_held_out_references_come_from_the_test_split(tiny_profile, tmp_path):
    from helpers.data.prepare import load_prepared

    refs, message = held_out_references(tiny_profile, tmp_path / "data", n=3)
    assert "prepared now" in message  # no notebook 01 output: prepared with the same call
    test = load_prepared(tmp_path / "data").test
    groups = dict(zip(map(str, test["id"]), test["group"]))
    assert len(refs) == 3 and set(refs) <= set(groups) and len({groups[i] for i in refs}) == 3
    again, message = held_out_references(tiny_profile, tmp_path / "data", n=3)
    assert "notebook 01 wrote" in message and list(again) == list(refs)


def test_batch_size_is_one_on_cpu():
    assert pick_batch_size("cpu", 512) == 1


def test_on_step_counts_denoising_steps_and_samples_name_the_sampler(bank, references):
    steps = []
    out = generate(bank, references, ["a cat"], models=["pretrained"], steps=3, progress=False,
                            on_step=lambda: steps.append(1))
    assert len(out) == 2 and len(steps) == 2 * 3  # two pipeline calls (one per reference) x 3 DDIM steps
    assert {s.sampler for s in out} == {"DDIMScheduler"}


def test_held_out_references_carry_their_captions(tiny_profile, tmp_path):
    from helpers.data.prepare import load_prepared

    refs, _ = held_out_references(tiny_profile, tmp_path / "data", n=2)
    test = load_prepared(tmp_path / "data").test
    own = dict(zip(map(str, test["id"]), test["text"]))
    assert set(refs.captions) == set(refs) and all(refs.captions[i] == own[i] for i in refs)


def test_samples_carry_the_identity_of_their_weights(bank, references, runs, tiny_profile):
    """Each Sample names the file its model's weights came from by content (helpers.sample.registry.adapter_sha256):
    a fine-tuned model its adapter.safetensors, the pretrained model the profile's IP-Adapter file."""
    import hashlib

    out = generate(bank, {"ref": references["ref"]}, ["a cat"], models=["pretrained", "finetuned-text-aware"],
                   steps=STEPS, progress=False)
    files = {"pretrained": tiny_profile.ip_adapter, "finetuned-text-aware": runs[1]["finetuned-text-aware"]}
    for s in out:
        with open(files[s.model], "rb") as f:
            assert s.adapter_sha256 == hashlib.sha256(f.read()).hexdigest()[:16] == bank.adapter_sha256(s.model)
    assert out[0].adapter_sha256 != out[1].adapter_sha256


def test_out_of_memory_in_a_pipeline_call_names_the_batch_size(bank, references, monkeypatch):
    """torch's CUDA out-of-memory error (raised by a patched pipeline call: no GPU here) becomes OutOfMemory,
    which says which setting to lower and to what; then a smaller batch gives the same images."""
    from helpers.sample.generate import OutOfMemory

    kwargs = dict(models=["pretrained"], seeds=(0, 1, 2, 3), steps=STEPS, progress=False)
    pipeline = type(bank.pipe)
    real_call = pipeline.__call__

    def call(self, *a, **k):
        if len(k["prompt"]) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_call(self, *a, **k)

    monkeypatch.setattr(pipeline, "__call__", call)
    with pytest.raises(OutOfMemory, match=r"Out of GPU memory generating 4 images of pretrained in one pipeline call "
                                          r"at 64 px \(CUDA out of memory.*from 4 to 2: pass batch_size=2 to "
                                          r"generate\(\)") as caught:
        generate(bank, {"ref": references["ref"]}, ["a cat"], batch_size=4, **kwargs)
    assert caught.value.batch_size == 4 and caught.value.__cause__ is None  # our message, not torch's traceback
    smaller = generate(bank, {"ref": references["ref"]}, ["a cat"], batch_size=2, **kwargs)
    monkeypatch.undo()
    one_by_one = generate(bank, {"ref": references["ref"]}, ["a cat"], batch_size=1, **kwargs)
    assert all(np.abs(pixels(a.image) - pixels(b.image)).max() <= 2 for a, b in zip(smaller, one_by_one))
    monkeypatch.setattr(pipeline, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(OutOfMemory, match="at one image per pipeline call: free GPU memory"):
        generate(bank, {"ref": references["ref"]}, ["a cat"], batch_size=1, **kwargs)


def test_masks_paint_only_their_references_background_white_before_the_image_encoder(bank, references, monkeypatch):
    seen = []  # what the image encoder gets, in the references' order
    features = bank.image_features
    monkeypatch.setattr(bank, "image_features", lambda image: seen.append(image.copy()) or features(image))
    flipped = np.asarray(references["flipped"].convert("RGB"))
    mask = np.zeros(flipped.shape[:2], bool)
    mask[20:90, 30:100] = True  # a box: the "character"
    out = generate(bank, references, ["a cat"], models=["pretrained"], steps=1, masks={"flipped": mask}, progress=False)
    assert [(s.reference, s.background) for s in out] == [("ref", "kept"), ("flipped", "removed")]
    ref, painted = (np.asarray(image) for image in seen)
    assert np.array_equal(ref, np.asarray(references["ref"].convert("RGB")))
    assert (flipped[~mask] != 255).any() and (painted[~mask] == 255).all() and np.array_equal(painted[mask], flipped[mask])
    assert np.array_equal(np.asarray(out[1].reference_image), painted)
    with pytest.raises(KeyError, match=r"masks given for unknown references \['other'\]"):
        generate(bank, references, ["a cat"], models=["pretrained"], masks={"other": mask}, progress=False)
