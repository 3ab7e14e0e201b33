"""helpers.model.conceptrol: with a mask of ones it is diffusers' IP-Adapter processor bit for bit; per layer and
with global masking it is the method written out by hand; concept tokens follow CLIP's BPE; the scale, the
bank's weight swap and the switch back all reach the same objects; a tiny pipeline runs with it."""
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _adapters import PROMPT, run

from helpers.model import conceptrol as C
from helpers.model.conceptrol import (
    SD15_GLOBAL_LAYER,
    ConceptNotFound,
    ConceptrolAttnProcessor,
    clear_concepts,
    concept_token_indices,
    conceptrol,
    recording_masks,
    set_concepts,
    stock_processors,
    use_conceptrol,
)
from helpers.model.official_format import adapter_parameters, adapter_state_dict
from helpers.tiny.assets import IMAGE_ENCODER_DIM, TEXT_DIM
from helpers.tiny.tokenizer import bytes_to_unicode

DOWN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # 8 x 8 in the tiny UNet at 64 px
DOWN_1 = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"  # 4 x 4
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"  # 1 x 1
UP_3 = "up_blocks.3.attentions.2.transformer_blocks.0.attn2"  # 8 x 8; SD15_GLOBAL_LAYER is 2 x 2
SIDE = {DOWN: 8, DOWN_1: 4, MID: 1, UP_3: 8, SD15_GLOBAL_LAYER: 2}


def layer_inputs(attn, batch: int, side: int, seed: int = 0):
    """Random image states (B, side^2, C), text states (B, 77, 32) and Plus image tokens [(B, 1, 16, 32)]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, side * side, attn.to_q.in_features, generator=g)
    text = torch.randn(batch, 77, TEXT_DIM, generator=g) * 3  # * 3: peaked softmaxes, masks far from uniform
    return x, (text, [torch.randn(batch, 1, 16, TEXT_DIM, generator=g)])


def nearest(mask, src: int, dst: int):
    """(N, src^2) -> (N, dst^2): nearest neighbour written out, source index floor(i * src / dst)."""
    pick = [math.floor(i * src / dst) for i in range(dst)]
    return mask.view(-1, src, src)[:, pick][:, :, pick].reshape(len(mask), dst * dst)


def by_hand(attn, stock, x, states, concepts, scale, mask=None):
    """The method as the paper and their code describe it, with an explicit softmax for both branches.
    Returns (layer output (B, HW, C), the conditional rows' mask (N, HW))."""
    text, (ip,) = states
    b, h = x.shape[0], attn.heads

    def split(t):  # (B, T, h * d) -> (B, h, T, d)
        return t.view(b, -1, h, t.shape[-1] // h).permute(0, 2, 1, 3)

    def attend(q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, HW, T)
        return probs, (probs @ v).permute(0, 2, 1, 3).reshape(b, -1, h * q.shape[-1])

    q = split(attn.to_q(x))
    probs, text_out = attend(q, split(attn.to_k(text)), split(attn.to_v(text)))
    ip = ip.flatten(1, 2)  # (B, 16, C)
    _, ip_out = attend(q, split(stock.to_k_ip[0](ip)), split(stock.to_v_ip[0](ip)))
    if mask is None:
        n, rows = len(concepts), []
        for i, idx in enumerate(concepts):
            a = probs[b - n + i][:, :, idx].mean(dim=-1).mean(dim=0)  # the conditional row: tokens, then heads
            rows.append(a / (a.max() + 1e-6))
        mask = torch.stack(rows)  # (N, HW)
    full = torch.stack([mask[r % len(mask)] for r in range(b)])  # row i and its twin N + i share one mask
    return attn.to_out[0](text_out + scale * ip_out * full[..., None]), mask


@pytest.fixture
def unet(vanilla):
    yield vanilla.unet
    stock_processors(vanilla.unet)
    vanilla.set_ip_adapter_scale(1.0)


@torch.no_grad()
def test_mask_of_ones_is_exactly_diffusers_processor(vanilla, unet, monkeypatch):
    monkeypatch.setattr(C, "concept_mask", lambda q, k, concepts, **kw: torch.ones(len(concepts), q.shape[2]))
    state = use_conceptrol(unet, global_layer=None)
    set_concepts(unet, [[2, 3], [5]])
    for name in (DOWN, SD15_GLOBAL_LAYER, MID):
        attn = unet.get_submodule(name)
        assert isinstance(attn.processor, ConceptrolAttnProcessor)
        for scale in (0.0, 0.4, 1.0, 2.5):
            vanilla.set_ip_adapter_scale(scale)
            x, states = layer_inputs(attn, 4, SIDE[name])  # guided: [negative x 2, positive x 2]
            assert torch.equal(attn(x, encoder_hidden_states=states),
                               state.originals[name](attn, x, encoder_hidden_states=states))
    # the whole UNet, global masking on: a resized mask of ones is ones
    vanilla.set_ip_adapter_scale(0.7)
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, TEXT_DIM, generator=g)
    embeds = {"image_embeds": [torch.randn(4, 1, 17, IMAGE_ENCODER_DIM, generator=g)]}
    use_conceptrol(unet)
    set_concepts(unet, [[2, 3], [5]])
    ours = unet(sample, 500, text, added_cond_kwargs=embeds).sample
    stock_processors(unet)
    assert torch.equal(ours, unet(sample, 500, text, added_cond_kwargs=embeds).sample)


@torch.no_grad()
@pytest.mark.parametrize("guided", [True, False])
def test_each_layer_equals_the_method_by_hand(vanilla, unet, guided):
    state = use_conceptrol(unet, global_layer=None)
    concepts = [[2, 3, 4], [6]]  # a concept of three tokens, one of one
    set_concepts(unet, concepts, guided=guided)
    vanilla.set_ip_adapter_scale(0.8)
    with recording_masks(unet) as record:
        for name in (DOWN, SD15_GLOBAL_LAYER, UP_3):
            attn = unet.get_submodule(name)
            x, states = layer_inputs(attn, 4 if guided else 2, SIDE[name])
            expected, mask = by_hand(attn, state.originals[name], x, states, concepts, 0.8)
            torch.testing.assert_close(attn(x, encoder_hidden_states=states), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(record[name][-1].flatten(1), mask, rtol=1e-5, atol=1e-6)
            assert mask.amax(dim=1).sub(1).abs().max() < 1e-4 and mask.amin() < 0.9  # normalised, not flat
            stock = state.originals[name](attn, x, encoder_hidden_states=states)
            assert not torch.allclose(attn(x, encoder_hidden_states=states), stock, atol=1e-4)  # masking acts


@torch.no_grad()
def test_global_mask_resized_is_what_the_other_layers_use(vanilla, unet):
    state = use_conceptrol(unet)  # SD15_GLOBAL_LAYER
    concepts = [[3], [4, 5]]
    set_concepts(unet, concepts)
    vanilla.set_ip_adapter_scale(1.0)

    def check(name, mask=None, seed=0):
        attn = unet.get_submodule(name)
        x, states = layer_inputs(attn, 4, SIDE[name], seed)
        expected, used = by_hand(attn, state.originals[name], x, states, concepts, 1.0, mask)
        torch.testing.assert_close(attn(x, encoder_hidden_states=states), expected, rtol=1e-5, atol=1e-5)
        return used

    check(DOWN)  # before the global layer has run (a run's first evaluation): the layer's own mask
    global_mask = check(SD15_GLOBAL_LAYER, seed=1)
    torch.testing.assert_close(state.global_mask, global_mask, rtol=1e-5, atol=1e-6)
    for name in (UP_3, DOWN_1, MID, DOWN):
        check(name, nearest(state.global_mask, 2, SIDE[name]), seed=2)


@torch.no_grad()
def test_global_mask_within_and_across_pipeline_calls(vanilla, unet, reference_image):
    """Layers after the global one use this evaluation's mask, those before it the previous one's (their
    own at a run's first); a new run starts afresh, so the same call twice gives the same image."""
    with conceptrol(unet, [concept_token_indices(vanilla.tokenizer, PROMPT, "boy")]):
        with recording_masks(unet) as first:
            image = run(vanilla, reference_image, num_inference_steps=3)
        with recording_masks(unet) as second:
            assert torch.equal(run(vanilla, reference_image, num_inference_steps=3), image)
    names = list(first)  # in the order the UNet calls them
    g = names.index(SD15_GLOBAL_LAYER)
    assert len(names) == 16 and g == 7 and all(len(first[n]) == 3 for n in names)
    for step in range(3):
        for name in names[g + 1:]:
            side = first[name][step].shape[-1]
            assert torch.equal(first[name][step].flatten(1), nearest(first[names[g]][step].flatten(1), 2, side))
        for name in names[:g]:
            side = first[name][step].shape[-1]
            if step:
                assert torch.equal(first[name][step].flatten(1), nearest(first[names[g]][step - 1].flatten(1), 2, side))
            else:
                assert not torch.equal(first[name][0].flatten(1), nearest(first[names[g]][2].flatten(1), 2, side))
            assert torch.equal(second[name][step], first[name][step])


def tiny_bpe(folder: Path):
    """A CLIP tokenizer whose BPE splits "morty" into "mor" + "ty</w>" and leaves other words in letters."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    merges = ["m o", "mo r", "t y</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["mo", "mor", "ty</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def by_offsets(tokenizer, prompt: str, concept: str) -> list[int]:
    """The tokenizer's own alignment: the tokens whose characters lie inside the concept's first occurrence."""
    start = prompt.lower().index(concept.lower())
    offsets = tokenizer(prompt, return_offsets_mapping=True).offset_mapping
    return [i for i, (s, e) in enumerate(offsets) if start <= s < e <= start + len(concept)]


def test_concept_tokens_with_a_bpe_that_splits_words(tmp_path):
    tok = tiny_bpe(tmp_path / "bpe")
    assert tok.tokenize("morty") == ["mor", "ty</w>"]
    prompt = "a drawing of morty in space"
    assert concept_token_indices(tok, prompt, "morty") == by_offsets(tok, prompt, "morty") == [11, 12]
    with pytest.raises(ConceptNotFound, match="'mor' not found in prompt 'a drawing of morty in space'"):
        concept_token_indices(tok, prompt, "mor")  # a piece of a word is not the word


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """SD 1.5's tokenizer files, derived from open_clip's published BPE as rehearsal/vocab.py does."""
    from transformers import CLIPTokenizer

    from rehearsal.vocab import clip_bpe, write_clip_tokenizer_files

    downloads = Path(tempfile.gettempdir()) / "ipa-rehearsal-downloads"
    vocab, merges, source = clip_bpe(downloads)  # installed open_clip, a wheel there, or pip download (PyPI)
    if not source.startswith("real"):
        pytest.skip(f"CLIP's real BPE vocabulary could not be had (no open_clip, no wheel in {downloads}, PyPI not "
                    f"reached): {source}")
    folder = tmp_path_factory.mktemp("clip_bpe")
    write_clip_tokenizer_files(folder, vocab, merges, vocab_style="sd")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


@pytest.mark.parametrize("prompt, concept, pieces", [
    ("a photo of a shiba inu on the beach", "shiba inu", 4),  # shi ba</w> in u</w>
    ("an axolotl in a snowy forest at night", "axolotl", 4),  # ax o lot l</w>
    ("A Shiba Inu hugging a wolf plushie", "wolf plushie", 3),  # wolf</w> plu shie</w>
    ("a cartoon character riding a bicycle", "cartoon character", 2),  # an edit prompt of notebook 05
])
def test_concept_tokens_with_clip_real_bpe(clip_tokenizer, prompt, concept, pieces):
    found = concept_token_indices(clip_tokenizer, prompt, concept)
    assert len(clip_tokenizer.tokenize(concept)) == pieces == len(found)
    assert found == by_offsets(clip_tokenizer, prompt, concept)
    ids = clip_tokenizer(prompt).input_ids
    assert clip_tokenizer.decode([ids[i] for i in found]).strip() == concept.lower()


def test_concept_not_found_is_reported(clip_tokenizer):
    assert concept_token_indices(clip_tokenizer, "a dog chasing a dog", "dog") == [2]  # the first
    with pytest.raises(ConceptNotFound, match="'cat' not found in prompt 'a dog on grass'") as err:
        concept_token_indices(clip_tokenizer, "a dog on grass", "cat")
    assert (err.value.prompt, err.value.concept) == ("a dog on grass", "cat")
    long = "a red hat, " * 25 + "and a shiba inu"
    with pytest.raises(ConceptNotFound, match="does not fit in the first 77 tokens"):
        concept_token_indices(clip_tokenizer, long, "shiba inu")


@torch.no_grad()
def test_scale_and_the_bank_weight_swap_reach_conceptrol(vanilla, unet):
    from helpers.sample.bank import ip_scales, set_ip_scale

    live, saved = adapter_parameters(unet, block=False), adapter_state_dict(unet)
    state = use_conceptrol(unet)
    assert len(state.originals) == 16
    ours = adapter_parameters(unet, block=False)
    assert list(ours) == list(live) and all(ours[k] is live[k] for k in live)  # the same Parameter objects
    assert all(torch.equal(v, saved[k]) for k, v in adapter_state_dict(unet).items())  # what save_adapter writes
    got = set_ip_scale(vanilla, 0.6, ("up_blocks.1",))  # the bank's checked per-block scale
    assert sum(v == 0.6 for v in got.values()) == 3 and sum(v == 0 for v in got.values()) == 13
    vanilla.set_ip_adapter_scale(0.3)
    assert set(ip_scales(unet).values()) == {0.3}
    assert all(p.scale == [0.3] for p in state.originals.values())  # one scale per layer, on or off
    attn = unet.get_submodule(SD15_GLOBAL_LAYER)
    set_concepts(unet, [2])
    x, states = layer_inputs(attn, 2, 2)
    before = attn(x, encoder_hidden_states=states)
    old = {k: p.data for k, p in live.items()}
    try:
        for key, param in live.items():  # what ModelBank.use does
            param.data = old[key] * 2
        weight = attn.processor.to_k_ip[0].weight
        key = next(n for n, p in live.items() if p is weight)
        assert weight is state.originals[SD15_GLOBAL_LAYER].to_k_ip[0].weight and torch.equal(weight, old[key] * 2)
        assert not torch.allclose(attn(x, encoder_hidden_states=states), before)
    finally:
        for key, param in live.items():
            param.data = old[key]
    assert torch.equal(attn(x, encoder_hidden_states=states), before)


def test_switching_off_restores_the_very_processors(unet):
    before, hooks = dict(unet.attn_processors), dict(unet._forward_pre_hooks)
    use_conceptrol(unet)
    use_conceptrol(unet, global_layer=None)  # twice: still the stock objects underneath
    originals = C.conceptrol_state(unet).originals
    assert len(originals) == 16 and all(p is before[n + ".processor"] for n, p in originals.items())
    stock_processors(unet)
    stock_processors(unet)  # off is off
    after = unet.attn_processors
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    assert dict(unet._forward_pre_hooks) == hooks
    with pytest.raises(KeyError), conceptrol(unet, [[1]]):
        raise KeyError("inside")
    assert all(unet.attn_processors[n] is before[n] for n in before)


def test_bad_settings_fail_clearly(vanilla, unet, reference_image):
    with pytest.raises(ValueError, match="global_layer 'up_blocks.0.attentions.0"):
        use_conceptrol(unet, global_layer="up_blocks.0.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(RuntimeError, match="Conceptrol is off"):
        set_concepts(unet, [[1]])
    with conceptrol(unet):
        with pytest.raises(ValueError, match="non-empty list"):
            set_concepts(unet, [[2], []])
        with pytest.raises(RuntimeError, match="no concepts are set"):
            run(vanilla, reference_image)
        set_concepts(unet, [[2], [3]])  # two rows, but one prompt
        with pytest.raises(ValueError, match=r"gave 2 index lists \(guided=True\), but this batch has 2 rows"):
            run(vanilla, reference_image)
        set_concepts(unet, np.array([2, 3]))  # numpy positions: one row
        clear_concepts(unet)  # another prompt's positions are never reused
        with pytest.raises(RuntimeError, match="no concepts are set"):
            run(vanilla, reference_image)


@torch.no_grad()
def test_tiny_pipeline_runs_with_conceptrol(vanilla, unet, reference_image):
    stock = run(vanilla, reference_image, prompt=[PROMPT, "a cat on grass"])
    concepts = [concept_token_indices(vanilla.tokenizer, PROMPT, "boy"),
                concept_token_indices(vanilla.tokenizer, "a cat on grass", "cat")]
    with conceptrol(unet, concepts), recording_masks(unet) as record:
        ours = run(vanilla, reference_image, prompt=[PROMPT, "a cat on grass"])
    assert ours.shape == stock.shape and torch.isfinite(ours).all() and not torch.allclose(ours, stock)
    assert [tuple(m.shape) for m in record[SD15_GLOBAL_LAYER]] == [(2, 2, 2)] * 2  # 2 prompts, 2 steps
    assert torch.equal(run(vanilla, reference_image, prompt=[PROMPT, "a cat on grass"]), stock)  # off again


@torch.no_grad()
def test_grids_that_are_not_square(vanilla, unet, reference_image):
    assert C.token_grid(32 * 48, (64, 96)) == (32, 48) and C.token_grid(35, (9, 13)) == (5, 7)  # 9 -> 5, 13 -> 7
    with pytest.raises(ValueError, match="cannot tell the grid of 8 image positions"):
        C.token_grid(8, None)
    with conceptrol(unet, [concept_token_indices(vanilla.tokenizer, PROMPT, "boy")]), recording_masks(unet) as record:
        image = run(vanilla, reference_image, height=64, width=128)  # latents 8 x 16
    assert image.shape[-2:] == (64, 128) and torch.isfinite(image).all()
    assert record[SD15_GLOBAL_LAYER][0].shape == (1, 2, 4) and record[UP_3][0].shape == (1, 8, 16)
    assert torch.equal(record[UP_3][1], C.resize_mask(record[SD15_GLOBAL_LAYER][1].flatten(1), (2, 4), (8, 16))
                       .view(1, 8, 16))
