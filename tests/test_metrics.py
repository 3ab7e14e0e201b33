"""helpers.metrics against a direct computation with transformers on the tiny CLIP and DINO."""
import datasets
import pytest
import torch
from PIL import ImageOps

from helpers import metrics


@pytest.fixture(scope="module")
def rows(tiny_profile):
    ds = datasets.load_dataset(tiny_profile.dataset, split="train")
    return [ds[i] for i in range(6)]


@pytest.fixture(scope="module")
def clip(tiny_profile):
    return metrics.get_clip(tiny_profile.eval_clip)


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
    got = metrics.clip_t(images, texts, clip=clip)
    assert got.shape == (len(rows),)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the x100 scale is torchmetrics' CLIPScore of each pair: max(100 cos, 0)
    torch.testing.assert_close(metrics.x100(got), torch.clamp(100 * expected, min=0), atol=1e-3, rtol=1e-5)


def test_clip_i_is_the_direct_clip_cosine_and_one_for_identical_images(rows, clip, direct):
    images = [r["image"] for r in rows]
    refs = images[1:] + images[:1]
    texts = ["a"] * len(images)
    a, _ = direct(images, texts)
    b, _ = direct(refs, texts)
    torch.testing.assert_close(metrics.clip_i(images, refs, clip=clip), (a * b).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics.clip_i(images, images, clip=clip), torch.ones(len(images)), atol=1e-5, rtol=0)


def test_the_id_string_loads_once_and_gives_the_same_scores(tiny_profile, rows, clip):
    assert metrics.get_clip(tiny_profile.eval_clip) is clip
    images, texts = [r["image"] for r in rows[:2]], [r["text"] for r in rows[:2]]
    torch.testing.assert_close(metrics.clip_t(images, texts, clip=tiny_profile.eval_clip), clip.text_image(images, texts))


def test_batches_do_not_change_the_scores(tiny_profile, rows):
    small = metrics.CLIPScorer(tiny_profile.eval_clip, batch_size=2)
    images, texts = [r["image"] for r in rows], [r["text"] for r in rows]
    torch.testing.assert_close(small.text_image(images, texts), metrics.clip_t(images, texts, clip=tiny_profile.eval_clip),
                               atol=1e-5, rtol=1e-5)


def test_torchmetrics_clipscore_on_the_same_model_gives_100_times_the_mean(rows, clip):
    """The wrapped model really is torchmetrics' model: its own CLIPScore aggregate matches our cosines."""
    images = [r["image"] for r in rows]
    refs = [ImageOps.mirror(im) for im in images]
    clip.metric.reset()
    clip.metric.update([metrics.to_chw_uint8(im) for im in images], [metrics.to_chw_uint8(im) for im in refs])
    expected = torch.clamp(100 * metrics.clip_i(images, refs, clip=clip).mean(), min=0)
    torch.testing.assert_close(clip.metric.compute().float(), expected, atol=1e-3, rtol=1e-5)
    clip.metric.reset()


def test_wrapper_returns_projected_tensors(clip, rows):
    proc = clip.processor(images=[rows[0]["image"]], text=["a cat"], return_tensors="pt", padding=True)
    img = clip.model.get_image_features(proc["pixel_values"])
    txt = clip.model.get_text_features(proc["input_ids"], proc["attention_mask"])
    dim = clip.model.config.projection_dim
    assert isinstance(img, torch.Tensor) and img.shape == (1, dim) and txt.shape == (1, dim)


def test_dino_is_the_cls_cosine_and_one_for_identical_images(tiny_profile, rows):
    from transformers import AutoImageProcessor, ViTModel

    images = [r["image"] for r in rows]
    refs = images[::-1]
    model = ViTModel.from_pretrained(tiny_profile.dino, add_pooling_layer=False).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_profile.dino)
    with torch.no_grad():
        cls = lambda ims: torch.nn.functional.normalize(  # noqa: E731
            model(**proc(images=ims, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)
        expected = (cls(images) * cls(refs)).sum(-1)
    torch.testing.assert_close(metrics.dino(images, refs, dino=tiny_profile.dino), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics.dino(images, images, dino=tiny_profile.dino), torch.ones(len(images)), atol=1e-5, rtol=0)


def test_bad_input_is_refused(clip, rows):
    with pytest.raises(ValueError, match="pair up"):
        metrics.clip_t([rows[0]["image"]], ["a", "b"], clip=clip)
    with pytest.raises(TypeError, match="one prompt per image"):
        metrics.clip_t([rows[0]["image"]], "a", clip=clip)
    with pytest.raises(ValueError, match="RGB image"):
        metrics.to_chw_uint8(torch.zeros(4, 8, 8))
    assert metrics.clip_t([], [], clip=clip).shape == (0,)
