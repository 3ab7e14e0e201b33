"""helpers.sample.bank: the registered models over one pipeline, each exactly its standalone pipeline; missing ones explained."""
import numpy as np
import pytest
import torch
from _samples import pixels

from helpers.model.official_format import (
    adapter_parameters,
    adapter_state_dict,
    official_to_live,
)
from helpers.model.pipeline import load_pipeline
from helpers.sample.bank import ip_scales, load_models, set_ip_scale
from helpers.sample.generate import generate
from helpers.sample.registry import BASELINES, FINETUNED, MODEL_NAMES, MODELS, label, opt_in_note
from helpers.train.pairing import run_name

STEPS = 2


def test_bank_offers_every_registered_model_over_one_pipeline(bank):
    assert bank.names == ["pretrained", "finetuned-vanilla", "finetuned-text-aware", "finetuned-text-aware-neighbour",
                          "finetuned-text-aware-mask-reference", "finetuned-text-aware-mask-loss",
                          "finetuned-text-aware-mask-both"]
    assert bank.names == [n for n in MODEL_NAMES if n not in BASELINES] and bank.missing == {}
    unet = bank.pipe.unet
    live = adapter_parameters(unet, block=False)
    key = "ip_adapter.1.to_k_ip.0.weight"
    seen = {}
    for name in bank.names:
        assert bank.use(name) is bank.pipe and bank.pipe.unet is unet  # one base pipeline
        assert live[key].data_ptr() == bank.models[name].params[key].data_ptr()  # swapped in place, no copy
        block = unet._modules.get("text_image_attn")
        assert (block is not None) == (name.startswith("finetuned-text-aware"))
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
    samples = generate(bank, {"r": reference_image}, [prompt], scales=(scale,), seeds=(seed,), steps=STEPS,
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
        assert "notebook 03" in bank.missing[name] and label(name) in bank.missing[name]
    printed = capsys.readouterr().out.splitlines()
    opt_in = [n for n in MODEL_NAMES if MODELS[n].opt_in]
    assert sorted(bank.missing) == sorted(FINETUNED) and sorted(bank.opt_in_untrained) == sorted(opt_in)
    # the headline models one line each; the four opt-in ones (neighbour, masked) one line, naming their settings
    assert printed == [f"{n} is not available: {bank.missing[n]}" for n in ("finetuned-vanilla", "finetuned-text-aware")
                       ] + [opt_in_note(opt_in), "Models available: pretrained"]
    assert ("finetuned-text-aware-neighbour (TRAIN_NEIGHBOUR = True), finetuned-text-aware-mask-reference "
            '(MASK = "reference"), finetuned-text-aware-mask-loss (MASK = "loss")') in printed[2]
    assert bank.describe().splitlines()[1:] == [f"{n}: NOT AVAILABLE - {bank.missing[n]}" for n in
                                                ("finetuned-vanilla", "finetuned-text-aware")] + [opt_in_note(opt_in)]
    with pytest.raises(KeyError, match="finetuned-vanilla.*no adapter at"):
        bank.use("finetuned-vanilla")
    with pytest.raises(KeyError, match="finetuned-text-aware-mask-loss.*no adapter at"):  # still explained on use
        bank.use("finetuned-text-aware-mask-loss")


def test_an_opt_in_model_asked_for_by_name_or_unusable_gets_its_own_line(tiny_profile, runs, tmp_path, capsys):
    """Notebook 05's EVAL_MODELS names the masked-loss model, the neighbour run's file is broken, an extra model is
    missing: each has its own line; only the two other masked runs, untrained and not asked for, share one."""
    for folder in ("vanilla", "text_aware"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "adapter.safetensors").write_bytes(runs[1][f"finetuned-{folder.replace('_', '-')}"]
                                                               .read_bytes())
    (tmp_path / "text_aware_neighbour").mkdir()
    (tmp_path / "text_aware_neighbour" / "adapter.safetensors").write_bytes(b"cut short")
    profile = tiny_profile.replace(eval_models=("finetuned-text-aware", "finetuned-text-aware-mask-loss"))
    bank = load_models(profile, tmp_path, extra={"mine": str(tmp_path / "nowhere")}, device="cpu")
    printed = capsys.readouterr().out.splitlines()
    quiet = ["finetuned-text-aware-mask-reference", "finetuned-text-aware-mask-both"]
    assert bank.names == ["pretrained", "finetuned-vanilla", "finetuned-text-aware"] and bank.opt_in_untrained == quiet
    assert sorted(bank.missing) == sorted(["finetuned-text-aware-neighbour", "finetuned-text-aware-mask-loss", "mine",
                                           *quiet])
    own = ["finetuned-text-aware-neighbour", "finetuned-text-aware-mask-loss", "mine"]
    assert printed[:-1] == [f"{n} is not available: {bank.missing[n]}" for n in own] + [opt_in_note(quiet)]
    assert "cannot use" in bank.missing["finetuned-text-aware-neighbour"] and "no adapter at" in printed[1]


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
    assert FINETUNED["finetuned-vanilla"][0] == run_name("vanilla", "self")
    assert FINETUNED["finetuned-text-aware"][0] == run_name("text_aware", "self")
    entry = FINETUNED["finetuned-text-aware-neighbour"]
    assert entry == (run_name("text_aware", "neighbour"), "text_aware")
    assert len({folder for folder, _ in FINETUNED.values()}) == len(FINETUNED)  # no two models share a folder


@pytest.fixture(scope="module")
def bank_with_baselines(tiny_profile, runs):
    return load_models(tiny_profile, runs[0], device="cpu", verbose=False, baselines=True)


INSTANTSTYLE = ("down_blocks.2.", "mid_block.", "up_blocks.1.")


def test_instantstyle_baseline_sets_its_layers_and_no_others(bank_with_baselines):
    bank = bank_with_baselines
    assert bank.names == list(MODEL_NAMES) and bank.missing == {}
    pipe = bank.use("pretrained-instantstyle")
    assert bank.models["pretrained-instantstyle"].params is bank.models["pretrained"].params  # same weights
    got = bank.set_ip_scale(0.7)
    read = {name: proc.scale for name, proc in pipe.unet.attn_processors.items() if hasattr(proc, "to_k_ip")}
    assert len(read) == 16 and {n: s[0] for n, s in read.items()} == got
    on = {n for n, s in read.items() if s != [0.0]}
    assert on == {n for n in read if n.startswith(INSTANTSTYLE)} and len(on) == 6  # 2 + 1 + 3 layers
    assert all(read[n] == [0.7] for n in on)
    bank.use("pretrained")
    assert set(bank.set_ip_scale(0.7).values()) == {0.7}  # the next model gets every layer back


def test_a_dict_diffusers_drops_without_a_word_is_refused(bank_with_baselines):
    pipe = bank_with_baselines.use("pretrained")
    # the trap: an SDXL-style dict names up_blocks.0, which has no attention in SD 1.5: every layer ends at 0
    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})
    assert set(ip_scales(pipe.unet).values()) == {0.0}
    with pytest.raises(ValueError, match="up_blocks.0.*hold no IP-Adapter attention"):
        set_ip_scale(pipe, 1.0, ("up_blocks.0",))


def test_baselines_generate_what_their_definition_says(bank_with_baselines, runs, tiny_profile, reference_image, tmp_path):
    """InstantStyle = diffusers' own pipeline with the per-block dict; block removed = the text-aware file's
    Resampler and to_k_ip/to_v_ip loaded as a plain vanilla adapter (diffusers' path, no block at all)."""
    from safetensors.torch import load_file, save_file

    bank = bank_with_baselines
    prompt, seed, scale = "a cartoon drawing of a girl", 3, 0.7
    names = ["pretrained", "pretrained-instantstyle", "finetuned-text-aware", "finetuned-text-aware-no-block"]
    samples = {s.model: s for s in generate(bank, {"r": reference_image}, [prompt], models=names,
                                                     scales=(scale,), seeds=(seed,), steps=STEPS, progress=False)}

    def standalone(adapter, per_block=None):
        pipe = load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, variant="vanilla", adapter=adapter,
                             device="cpu")
        pipe.set_ip_adapter_scale(per_block or scale)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt, ip_adapter_image=reference_image, num_inference_steps=STEPS,
                    guidance_scale=tiny_profile.guidance_scale, height=tiny_profile.resolution,
                    width=tiny_profile.resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    style = standalone(None, {"down": {"block_2": scale}, "mid": scale, "up": {"block_1": scale}})
    assert np.array_equal(pixels(samples["pretrained-instantstyle"].image), pixels(style))
    assert not np.array_equal(pixels(style), pixels(samples["pretrained"].image))
    tensors = load_file(str(runs[1]["finetuned-text-aware"]))
    without = {k: v for k, v in tensors.items() if not k.startswith("text_image_attn.")}
    assert len(without) < len(tensors)
    save_file(without, str(tmp_path / "no_block.safetensors"), metadata={"variant": "vanilla"})
    removed = standalone(tmp_path / "no_block.safetensors")
    assert np.array_equal(pixels(samples["finetuned-text-aware-no-block"].image), pixels(removed))
    assert not np.array_equal(pixels(removed), pixels(samples["finetuned-text-aware"].image))  # the block does something
    assert samples["finetuned-text-aware-no-block"].variant == "vanilla"


def test_labels_and_a_missing_source(tiny_profile, tmp_path):
    assert label("finetuned-text-aware-no-block") == "fine-tuned text-aware, block removed" and label("mine") == "mine"
    bank = load_models(tiny_profile, tmp_path, device="cpu", verbose=False, baselines=True)
    assert bank.names == ["pretrained", "pretrained-instantstyle", "pretrained-conceptrol"]
    assert "derived from finetuned-text-aware" in bank.missing["finetuned-text-aware-no-block"]
    assert "IP-Adapter only in down_blocks.2, mid_block, up_blocks.1" in bank.describe()


def test_conceptrol_is_the_pretrained_adapter_masked_by_the_prompts_subject(bank_with_baselines, tiny_profile,
                                                                            reference_image):
    """The bank's Conceptrol = a standalone pretrained pipeline with helpers.model.conceptrol switched on for the
    prompt's subject; the models generated after it (InstantStyle, block removed) are unchanged, because the
    bank puts diffusers' own processors back."""
    from helpers.model.conceptrol import ConceptNotFound, concept_token_indices, conceptrol, conceptrol_state

    bank = bank_with_baselines
    prompt, seed, scale = "a cartoon drawing of a girl with red hair", 3, 0.7
    others = ["pretrained-instantstyle", "finetuned-text-aware-no-block"]

    def run(models):
        return {s.model: s for s in generate(bank, {"r": reference_image}, [prompt], models=models, scales=(scale,),
                                             seeds=(seed,), steps=STEPS, progress=False)}

    before = run(others)
    made = run(["pretrained-conceptrol", "pretrained", *others])
    assert made["pretrained-conceptrol"].concept == "girl" and made["pretrained"].concept == ""
    for name in others:
        assert np.array_equal(pixels(made[name].image), pixels(before[name].image)), name
    pipe = load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, variant="vanilla", device="cpu")
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    with conceptrol(pipe.unet, [concept_token_indices(pipe.tokenizer, prompt, "girl")]):
        alone = pipe(prompt, ip_adapter_image=reference_image, num_inference_steps=STEPS,
                     guidance_scale=tiny_profile.guidance_scale, height=tiny_profile.resolution,
                     width=tiny_profile.resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    assert np.array_equal(pixels(made["pretrained-conceptrol"].image), pixels(alone))
    assert not np.array_equal(pixels(alone), pixels(made["pretrained"].image))  # the mask does something
    # no words name a subject: masked by the whole prompt (helpers.data.subjects), never unmasked
    whole, = generate(bank, {"r": reference_image}, ["in space"], models=["pretrained-conceptrol"], steps=STEPS,
                      progress=False)
    assert whole.concept == "in space"
    with pytest.raises(ConceptNotFound, match="concept 'cat' not found in prompt 'in space'"):
        generate(bank, {"r": reference_image}, ["in space"], models=["pretrained-conceptrol"], steps=STEPS,
                 concepts={"in space": "cat"}, progress=False)
    run(["pretrained-conceptrol"])
    assert conceptrol_state(bank.pipe.unet).concepts is None  # the call's own concepts, forgotten after it
