"""helpers.bank: the registered models over one pipeline, each exactly its standalone pipeline; missing ones explained."""
import numpy as np
import pytest
import torch
from _samples import pixels

from helpers import sampling
from helpers.adapter import load_pipeline
from helpers.adapter_file import adapter_parameters, adapter_state_dict, official_to_live
from helpers.bank import FINETUNED, MODEL_LABELS, MODEL_NAMES, load_models
from helpers.pairing import run_name


STEPS = 2


def test_bank_offers_every_registered_model_over_one_pipeline(bank):
    assert bank.names == ["pretrained", "finetuned-vanilla", "finetuned-text-aware", "finetuned-text-aware-neighbour"]
    assert bank.names == list(MODEL_NAMES) and bank.missing == {}
    unet = bank.pipe.unet
    live = adapter_parameters(unet, block=False)
    key = "ip_adapter.1.to_k_ip.0.weight"
    seen = {}
    for name in bank.names:
        assert bank.use(name) is bank.pipe and bank.pipe.unet is unet  # one base pipeline
        assert live[key].data_ptr() == bank.models[name].params[key].data_ptr()  # swapped in place, no copy
        block = unet._modules.get("text_image_attn")
        assert (block is not None) == (name in ("finetuned-text-aware", "finetuned-text-aware-neighbour"))
        seen[name] = live[key].detach().clone()
    assert not torch.equal(seen["pretrained"], seen["finetuned-vanilla"])
    assert not torch.equal(seen["finetuned-vanilla"], seen["finetuned-text-aware"])
    assert not torch.equal(seen["finetuned-text-aware"], seen["finetuned-text-aware-neighbour"])


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


def test_missing_adapters_give_a_clear_message_and_the_pretrained_model(tiny_profile, tmp_path, capsys):
    bank = load_models(tiny_profile, tmp_path / "runs", device="cpu")
    assert bank.names == ["pretrained"]
    for name, folder in [("finetuned-vanilla", "vanilla"), ("finetuned-text-aware", "text_aware"),
                         ("finetuned-text-aware-neighbour", "text_aware_neighbour")]:
        assert str(tmp_path / "runs" / folder / "adapter.safetensors") in bank.missing[name]
        assert "notebook 03" in bank.missing[name] and MODEL_LABELS[name] in bank.missing[name]
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


def test_registry_folders_are_the_training_run_folders():
    """notebook 03 trains into runs/<run_name(variant, pairing)>; the bank must look exactly there."""
    assert FINETUNED["finetuned-vanilla"].folder == run_name("vanilla", "self")
    assert FINETUNED["finetuned-text-aware"].folder == run_name("text_aware", "self")
    entry = FINETUNED["finetuned-text-aware-neighbour"]
    assert entry.folder == run_name("text_aware", "neighbour") and entry.variant == "text_aware"
    assert len({e.folder for e in FINETUNED.values()}) == len(FINETUNED)  # no two models share a folder
