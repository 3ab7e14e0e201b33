"""helpers.evaluate.metrics against a direct computation with transformers on the tiny CLIP and DINO."""
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers.evaluate.metrics import (
    CLIPScorer,
    clip_i,
    clip_image_processor,
    clip_t,
    dino,
    dino_image_processor,
    get_clip,
    get_dino,
    to_chw_uint8,
    x100,
)


@pytest.fixture(scope="module")
def rows(tiny_profile):
    ds = datasets.load_dataset(tiny_profile.dataset, split="train")
    return [ds[i] for i in range(6)]


@pytest.fixture(scope="module")
def clip(tiny_profile):
    return get_clip(tiny_profile.eval_clip)


@pytest.fixture(scope="module")
def direct(tiny_profile):
    """The reference computation: transformers' CLIPModel forward, its normalised embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_profile.eval_clip).eval()
    proc = CLIPProcessor.from_pretrained(tiny_profile.eval_clip)

    def embed(images, texts):
        with torch.no_grad():
            out = model(**proc(text=texts, images=images, return_tensors="pt", padding=True))
        return out.image_embeds, out.text_embeds  # unit length

    return embed


def test_clip_t_is_the_direct_clip_cosine(rows, clip, direct):
    images, texts = [r["image"] for r in rows], [r["text"] for r in rows]
    image_emb, text_emb = direct(images, texts)
    expected = (image_emb * text_emb).sum(-1)
    got = clip_t(images, texts, clip=clip)
    assert got.shape == (len(rows),)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the x100 scale is torchmetrics' CLIPScore of each pair: max(100 cos, 0)
    torch.testing.assert_close(x100(got), torch.clamp(100 * expected, min=0), atol=1e-3, rtol=1e-5)


def test_clip_i_is_the_direct_clip_cosine_and_one_for_identical_images(rows, clip, direct):
    images = [r["image"] for r in rows]
    refs = images[1:] + images[:1]
    texts = ["a"] * len(images)
    a, _ = direct(images, texts)
    b, _ = direct(refs, texts)
    torch.testing.assert_close(clip_i(images, refs, clip=clip), (a * b).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_i(images, images, clip=clip), torch.ones(len(images)), atol=1e-5, rtol=0)


def test_the_id_string_loads_once_and_gives_the_same_scores(tiny_profile, rows, clip):
    assert get_clip(tiny_profile.eval_clip) is clip
    images, texts = [r["image"] for r in rows[:2]], [r["text"] for r in rows[:2]]
    torch.testing.assert_close(clip_t(images, texts, clip=tiny_profile.eval_clip), clip.text_image(images, texts))


def test_batches_do_not_change_the_scores(tiny_profile, rows):
    small = CLIPScorer(tiny_profile.eval_clip, batch_size=2)
    images, texts = [r["image"] for r in rows], [r["text"] for r in rows]
    torch.testing.assert_close(small.text_image(images, texts), clip_t(images, texts, clip=tiny_profile.eval_clip),
                               atol=1e-5, rtol=1e-5)


def test_torchmetrics_clipscore_on_the_same_model_gives_100_times_the_mean(rows, clip):
    """The wrapped model really is torchmetrics' model: its own CLIPScore aggregate matches our cosines."""
    images = [r["image"] for r in rows]
    refs = [ImageOps.mirror(im) for im in images]
    clip.metric.reset()
    clip.metric.update([to_chw_uint8(im) for im in images], [to_chw_uint8(im) for im in refs])
    expected = torch.clamp(100 * clip_i(images, refs, clip=clip).mean(), min=0)
    torch.testing.assert_close(clip.metric.compute().float(), expected, atol=1e-3, rtol=1e-5)
    clip.metric.reset()


def test_wrapper_returns_projected_tensors(clip, rows):
    proc = clip.processor(images=[rows[0]["image"]], text=["a cat"], return_tensors="pt", padding=True)
    img = clip.model.get_image_features(proc["pixel_values"])
    txt = clip.model.get_text_features(proc["input_ids"], proc["attention_mask"])
    dim = clip.model.config.projection_dim
    assert isinstance(img, torch.Tensor) and img.shape == (1, dim) and txt.shape == (1, dim)


def test_dino_is_the_cls_cosine_and_one_for_identical_images(tiny_profile, rows):
    from transformers import ViTModel

    images = [r["image"] for r in rows]
    refs = images[::-1]
    model = ViTModel.from_pretrained(tiny_profile.dino, add_pooling_layer=False).eval()
    config = processor_config(tiny_profile.dino)
    with torch.no_grad():
        cls = lambda ims: torch.nn.functional.normalize(  # noqa: E731
            model(pixel_values=torch.stack([by_hand(im, config) for im in ims])).last_hidden_state[:, 0], dim=-1)
        expected = (cls(images) * cls(refs)).sum(-1)
    torch.testing.assert_close(dino(images, refs, dino=tiny_profile.dino), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dino(images, images, dino=tiny_profile.dino), torch.ones(len(images)), atol=1e-5, rtol=0)


def test_bad_input_is_refused(clip, rows):
    with pytest.raises(ValueError, match="pair up"):
        clip_t([rows[0]["image"]], ["a", "b"], clip=clip)
    with pytest.raises(TypeError, match="one prompt per image"):
        clip_t([rows[0]["image"]], "a", clip=clip)
    with pytest.raises(ValueError, match="RGB image"):
        to_chw_uint8(torch.zeros(4, 8, 8))
    assert clip_t([], [], clip=clip).shape == (0,)


# --------------------------------------------------------------------------------------------------
# Preprocessing: the same pixels on every transformers version (and with or without torchvision)
# --------------------------------------------------------------------------------------------------

def processor_config(folder) -> dict:
    """The image processor settings saved in a model folder: preprocessor_config.json, or the
    `image_processor` part of processor_config.json (where transformers 5 saves a whole processor)."""
    folder = Path(folder)
    if (folder / "preprocessor_config.json").exists():
        return json.loads((folder / "preprocessor_config.json").read_text())
    return json.loads((folder / "processor_config.json").read_text())["image_processor"]


def by_hand(image: Image.Image, config: dict) -> torch.Tensor:
    """A preprocessor_config.json applied by hand, as the Hub's CLIP and ViT files mean it: resize (a
    square, or the short side to `size` keeping the aspect), centre crop, x / 255, (x - mean) / std.
    Returns (3, H, W) float32. Legacy files give `size`/`crop_size` as an int."""
    size, crop = config["size"], config.get("crop_size")
    w, h = image.size
    if isinstance(size, dict) and "shortest_edge" in size or isinstance(size, int) and config.get("do_center_crop"):
        s = size["shortest_edge"] if isinstance(size, dict) else size
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    else:
        new_h, new_w = (size["height"], size["width"]) if isinstance(size, dict) else (size, size)
    x = np.asarray(image.convert("RGB").resize((new_w, new_h), resample=config["resample"]))
    if config.get("do_center_crop"):
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        x = x[top:top + ch, left:left + cw]
    x = (x.astype(np.float64) * config.get("rescale_factor", 1 / 255)).astype(np.float32)
    x = (x - np.float32(config["image_mean"])) / np.float32(config["image_std"])
    return torch.from_numpy(x).permute(2, 0, 1)


# The two full-profile models' files in the legacy format the Hub holds them in (int sizes,
# `feature_extractor_type`), values as published for openai/clip-vit-large-patch14 and facebook/dino-vits16.
LEGACY_CLIP = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
               "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
LEGACY_DINO = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}


@pytest.mark.parametrize("which", ["clip", "dino"])
@pytest.mark.parametrize("files", ["tiny", "legacy"])
def test_image_processors_give_the_hand_computed_pixels(which, files, tiny_profile, rows, tmp_path):
    """Equal tensors, not close ones: the same pixels on transformers 5.15 (Colab) and the newest, with
    no torchvision needed. Non-square images exercise the short-side resize and the centre crop; a 512 px
    one (a generated sample) is scaled down, the 128 px drawings up. (Pillow itself resizes differently
    from 13.0 on: the pixels are the same for the same Pillow.)"""
    if files == "tiny":
        folder = Path(tiny_profile.eval_clip if which == "clip" else tiny_profile.dino)
    else:
        folder = tmp_path
        (folder / "preprocessor_config.json").write_text(json.dumps(LEGACY_CLIP if which == "clip" else LEGACY_DINO))
    config = processor_config(folder)
    load = clip_image_processor if which == "clip" else dino_image_processor
    image = rows[0]["image"]
    images = [image, image.resize((image.width * 3 // 2, image.height)), image.resize((image.width, image.height * 2 + 1)),
              image.resize((512, 384))]
    got = load(str(folder))(images=images, return_tensors="pt")["pixel_values"]
    expected = torch.stack([by_hand(im, config) for im in images])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_scorers_use_those_processors(clip, tiny_profile, rows):
    config = processor_config(tiny_profile.eval_clip)
    image = rows[0]["image"]
    got = clip.processor(images=[image], text=["a"], return_tensors="pt", padding=True)["pixel_values"][0]
    torch.testing.assert_close(got, by_hand(image, config), atol=0, rtol=0)
    got = get_dino(tiny_profile.dino).processor(images=[image], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, by_hand(image, processor_config(tiny_profile.dino)), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Subject-only scores: the character alone, the background alone
# --------------------------------------------------------------------------------------------------

def _drawing(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _box(size=64, top=16, left=12, h=30, w=24):
    m = np.zeros((size, size), bool)
    m[top:top + h, left:left + w] = True
    return m


def test_subject_scores_are_fill_embed_cosine_by_hand_and_tell_a_copied_picture_from_a_kept_character(clip,
                                                                                                    tiny_profile):
    """By hand: every pixel off the mask set to white, CLIP's (DINO's) embedding of each, their cosine. A copied
    picture scores 1 on the character and on the background; the same character pasted into another scene
    still scores 1 on the character, and lower on the background and on the whole image."""
    from helpers.evaluate.metrics import SUBJECT_FILL, subject_scores

    dino_s = get_dino(tiny_profile.dino)
    reference, m_ref = _drawing(0), _box()
    other, m_other = _drawing(1), _box(top=20, left=30, h=20, w=20)
    scene = Image.fromarray(np.where(m_ref[..., None], np.asarray(reference), np.asarray(_drawing(2))))
    outputs, masks = [other, reference, scene], [m_other, m_ref, m_ref]
    got = subject_scores(outputs, masks, [reference] * 3, [m_ref] * 3, clip=clip, dino=dino_s)

    def filled(image, mask):  # numpy, not helpers.data.masks.fill_background
        return Image.fromarray(np.where(mask[..., None], np.asarray(image), np.uint8(SUBJECT_FILL)).astype(np.uint8))

    def cosine(embed, a, b):
        ea, eb = embed(a), embed(b)
        return (ea * eb).sum(-1) / (ea.norm(dim=-1) * eb.norm(dim=-1))

    def clip_embed(images):
        with torch.no_grad():
            pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
            return clip.model.get_image_features(pixels)

    def dino_embed(images):
        with torch.no_grad():
            pixels = dino_s.processor(images=images, return_tensors="pt")["pixel_values"]
            return dino_s.model(pixel_values=pixels).last_hidden_state[:, 0]

    on = [filled(o, m) for o, m in zip(outputs, masks)]
    off = [filled(o, ~m) for o, m in zip(outputs, masks)]
    torch.testing.assert_close(got["clip_i_subject"], cosine(clip_embed, on, [filled(reference, m_ref)] * 3))
    torch.testing.assert_close(got["dino_subject"], cosine(dino_embed, on, [filled(reference, m_ref)] * 3))
    torch.testing.assert_close(got["clip_i_background"], cosine(clip_embed, off, [filled(reference, ~m_ref)] * 3))
    copied, kept = 1, 2
    for name in ("clip_i_subject", "dino_subject"):
        assert got[name][copied] == pytest.approx(1, abs=1e-5) and got[name][kept] == pytest.approx(1, abs=1e-5)
    assert got["clip_i_background"][copied] == pytest.approx(1, abs=1e-5)
    whole = clip_i([scene], [reference], clip=clip)[0]
    assert got["clip_i_background"][kept] < 1 - 1e-3 and whole < 1 - 1e-3  # only the subject score keeps it


def test_an_empty_mask_gives_nan_and_a_full_one_no_background_score(clip, tiny_profile):
    from helpers.evaluate.metrics import subject_scores

    reference, m_ref = _drawing(0), _box()
    empty, full = np.zeros((64, 64), bool), np.ones((64, 64), bool)
    got = subject_scores([_drawing(1)] * 3, [empty, m_ref, full], [reference, reference, reference],
                         [m_ref, empty, m_ref], clip=clip, dino=tiny_profile.dino)
    assert torch.isnan(got["clip_i_subject"][:2]).all() and torch.isnan(got["dino_subject"][:2]).all()
    assert torch.isfinite(got["clip_i_subject"][2]) and torch.isfinite(got["clip_i_background"][:2]).all()
    assert torch.isnan(got["clip_i_background"][2])  # nothing off a full mask


def test_outputs_are_segmented_with_their_prompts_subject_words(tiny_profile):
    from helpers.data.masks import segment
    from helpers.evaluate.metrics import output_masks, subject_words

    assert subject_words("a cartoon character riding a bicycle") == "cartoon character"
    assert subject_words("in space") == "a cartoon character"  # none named: the stated default
    images, prompts = [_drawing(3), _drawing(4)], ["a watercolor painting of a cartoon character", "in space"]
    got = output_masks(images, prompts, segmenter=tiny_profile.segmenter, threshold=0.5)
    want = segment(images, ["cartoon character", "a cartoon character"], segmenter=tiny_profile.segmenter,
                   threshold=0.5)
    assert got.shape == (2, 64, 64) and got.dtype == bool and np.array_equal(got, want)
