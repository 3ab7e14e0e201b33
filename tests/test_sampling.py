"""helpers.sampling: the model bank, generation, grids and saved settings, on the tiny profile (64 px, 2 steps)."""
import csv
import json

import numpy as np
import pytest
import torch
from _adapters import write_finetuned_adapters
from PIL import Image

from helpers import sample_files, sampling
from helpers.adapter import load_pipeline
from helpers.adapter_file import adapter_parameters, adapter_state_dict, official_to_live
from helpers.bank import load_models
from helpers.figures import image_grid
from helpers.sampling import Sample

STEPS = 2


@pytest.fixture(scope="module")
def runs(tiny_profile, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, write_finetuned_adapters(tiny_profile, root)


@pytest.fixture(scope="module")
def bank(tiny_profile, runs):
    return load_models(tiny_profile, runs[0], device="cpu", verbose=False)


@pytest.fixture(scope="module")
def references(reference_image):
    return {"ref": reference_image, "flipped": reference_image.transpose(Image.FLIP_LEFT_RIGHT)}


def pixels(image):
    return np.asarray(image).astype(int)


def test_bank_offers_three_models_over_one_pipeline(bank):
    assert bank.names == ["pretrained", "finetuned-vanilla", "finetuned-text-aware"] and bank.missing == {}
    unet = bank.pipe.unet
    live = adapter_parameters(unet, block=False)
    key = "ip_adapter.1.to_k_ip.0.weight"
    seen = {}
    for name in bank.names:
        assert bank.use(name) is bank.pipe and bank.pipe.unet is unet  # one base pipeline
        assert live[key].data_ptr() == bank.models[name].params[key].data_ptr()  # swapped in place, no copy
        block = unet._modules.get("text_image_attn")
        assert (block is not None) == (name == "finetuned-text-aware")
        seen[name] = live[key].detach().clone()
    assert not torch.equal(seen["pretrained"], seen["finetuned-vanilla"])
    assert not torch.equal(seen["finetuned-vanilla"], seen["finetuned-text-aware"])


def test_official_keys_map_onto_the_live_parameters(bank):
    unet = bank.use("finetuned-text-aware").unet
    live = adapter_parameters(unet, block=False)
    converted = official_to_live(adapter_state_dict(unet))
    assert set(converted) == set(live)
    assert all(torch.equal(converted[k], live[k].detach()) for k in live)


def test_bank_models_equal_standalone_pipelines(bank, runs, tiny_profile, reference_image):
    """Swapping is exact: each bank model (all generated in one call, so the swaps happen in between)
    gives the very pixels of a pipeline loaded on its own with load_pipeline(adapter=file)."""
    files = runs[1]
    prompt, seed, scale = "a cartoon drawing of a girl", 3, 0.7
    samples = sampling.generate(bank, {"r": reference_image}, [prompt], scales=(scale,), seeds=(seed,), steps=STEPS,
                                progress=False)
    assert [s.model for s in samples] == bank.names
    for s in samples:
        pipe = load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, variant=s.variant,
                             adapter=files.get(s.model), device="cpu")
        pipe.set_ip_adapter_scale(scale)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(prompt, ip_adapter_image=reference_image, num_inference_steps=STEPS,
                        guidance_scale=tiny_profile.guidance_scale, height=tiny_profile.resolution,
                        width=tiny_profile.resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        assert np.array_equal(pixels(s.image), pixels(expected)), s.model
    assert not np.array_equal(pixels(samples[0].image), pixels(samples[2].image))


def test_same_seed_same_image_different_seeds_differ_batching_does_not_matter(bank, references):
    kwargs = dict(models=["finetuned-text-aware"], seeds=(0, 1), steps=STEPS, progress=False)
    one = sampling.generate(bank, references, ["a cat", "a robot"], batch_size=1, **kwargs)
    again = sampling.generate(bank, references, ["a cat", "a robot"], batch_size=1, **kwargs)
    batched = sampling.generate(bank, references, ["a cat", "a robot"], batch_size=3, **kwargs)
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
    out = sampling.generate(bank, {"r": reference_image}, ["a cat"], scales=(0.0,), steps=STEPS, progress=False)
    assert len(out) == 3 and all(np.array_equal(pixels(s.image), pixels(out[0].image)) for s in out)


def test_per_reference_prompts_and_progress_callback(bank, references):
    calls = []
    out = sampling.generate(bank, references, {"ref": ["a cat"], "flipped": ["a dog", "a robot"]},
                            models=["pretrained"], steps=STEPS, progress=lambda done, total: calls.append((done, total)))
    assert [(s.reference, s.prompt) for s in out] == [("ref", "a cat"), ("flipped", "a dog"), ("flipped", "a robot")]
    assert calls[-1] == (3, 3)
    with pytest.raises(KeyError, match="unknown references"):
        sampling.generate(bank, references, {"nope": ["a cat"]}, progress=False)
    with pytest.raises(KeyError, match="not available"):
        sampling.generate(bank, references, ["a cat"], models=["finetuned-lora"], progress=False)


def test_missing_adapters_give_a_clear_message_and_the_pretrained_model(tiny_profile, tmp_path, capsys):
    bank = load_models(tiny_profile, tmp_path / "runs", device="cpu")
    assert bank.names == ["pretrained"]
    for name, folder in [("finetuned-vanilla", "vanilla"), ("finetuned-text-aware", "text_aware")]:
        assert str(tmp_path / "runs" / folder / "adapter.safetensors") in bank.missing[name]
        assert "notebook 03" in bank.missing[name]
    printed = capsys.readouterr().out
    assert printed.count("finetuned-vanilla is not available") == 1 and "Models available: pretrained" in printed
    with pytest.raises(KeyError, match="finetuned-vanilla.*no adapter at"):
        bank.use("finetuned-vanilla")


def test_unreadable_or_wrong_adapters_are_reported_not_raised(tiny_profile, runs, tmp_path):
    (tmp_path / "vanilla").mkdir()
    (tmp_path / "vanilla" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "text_aware").mkdir()  # a vanilla adapter where the text-aware one should be
    (tmp_path / "text_aware" / "adapter.safetensors").write_bytes(runs[1]["finetuned-vanilla"].read_bytes())
    bank = load_models(tiny_profile, tmp_path, device="cpu", verbose=False)
    assert bank.names == ["pretrained"]
    assert "not a readable safetensors file" in bank.missing["finetuned-vanilla"]
    assert "is a vanilla adapter" in bank.missing["finetuned-text-aware"]
    assert "NOT AVAILABLE" in bank.describe()


def _fake_samples(models=("pretrained", "finetuned-vanilla"), scales=(0.5, 1.0), refs=("a", "b"), size=64):
    ref_images = {r: Image.new("RGB", (size, size), (200, 10 * i, 0)) for i, r in enumerate(refs)}
    out = []
    for m in models:
        for sc in scales:
            for r in refs:
                out.append(Sample(Image.new("RGB", (size, size), (0, int(100 * sc), 50)), m, r, "a cartoon drawing",
                                  sc, 0, 4, 7.5, resolution=size, variant="vanilla", profile="tiny",
                                  reference_image=ref_images[r]))
    return out


def test_grid_has_the_right_size_labels_and_thumbnails():
    samples = _fake_samples()
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


def test_saved_settings_round_trip(tmp_path):
    samples = _fake_samples(scales=(0.5,))
    samples[0].prompt, samples[0].negative_prompt = 'a "quoted", prompt, with commas', "blurry"
    paths = sample_files.save_samples(samples, tmp_path)
    assert len(paths) == len(set(paths)) == 4 and all(p.suffix == ".png" for p in paths)
    for s, p in zip(samples, paths):
        assert sample_files.read_settings(p) == s.settings()
        with Image.open(p) as im:
            assert im.text["prompt"] == s.prompt and im.text["seed"] == "0"  # readable in any PNG viewer
    rows = json.loads((tmp_path / "index.json").read_text())
    assert [r["file"] for r in rows] == [p.name for p in paths] and rows[0]["scale"] == 0.5
    with open(tmp_path / "index.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["prompt"] == samples[0].prompt and table[0]["model"] == "pretrained"
    back = sample_files.load_saved(tmp_path)
    assert [b.settings() for b in back] == [s.settings() for s in samples]
    assert all(np.array_equal(pixels(b.image), pixels(s.image)) for b, s in zip(back, samples))
    sample_files.save_samples(samples[:1], tmp_path)  # the same image again: no duplicate row
    sample_files.save_samples(_fake_samples(scales=(1.0,))[:1], tmp_path)  # another one: one more row
    assert len(json.loads((tmp_path / "index.json").read_text())) == 5
    with pytest.raises(ValueError, match="no 'ipa-settings'"):
        Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
        sample_files.read_settings(tmp_path / "plain.png")


def test_held_out_references_come_from_the_test_split(tiny_profile, tmp_path):
    from helpers.data import load_prepared

    refs, message = sampling.held_out_references(tiny_profile, tmp_path / "data", n=3)
    assert "prepared now" in message  # no notebook 01 output: prepared with the same call
    test = load_prepared(tmp_path / "data").test
    groups = dict(zip(map(str, test["id"]), test["group"]))
    assert len(refs) == 3 and set(refs) <= set(groups) and len({groups[i] for i in refs}) == 3
    again, message = sampling.held_out_references(tiny_profile, tmp_path / "data", n=3)
    assert "notebook 01 wrote" in message and list(again) == list(refs)


def test_batch_size_is_one_on_cpu():
    assert sampling.pick_batch_size("cpu", 512) == 1
