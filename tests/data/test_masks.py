"""helpers.data.masks: each mask source reaches the stored masks as given (the cartoons' oracle, IoU 1), CLIPSeg's
mask is sigmoid, resize, threshold, a change of segmenter or threshold is detected, and missing or stale masks
stop with a message that says what to do."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import helpers.data.masks as masks_module
from helpers.data.masks import (
    MASKS_FILE,
    MasksError,
    MasksMissing,
    fill_background,
    load_masks,
    load_segmenter,
    mask_prompt,
    prepare_masks,
    segment,
    segment_probabilities,
    segmenter_processor,
    to_latent,
)
from helpers.data.prepare import prepare_dataset
from helpers.data.sources import DataSourceError
from helpers.data.subjects import MASK_SUBJECT_DEFAULT
from helpers.tiny.cartoons import cartoon_rows

CIDAS_FILES = Path(__file__).parents[2] / "rehearsal" / "hub_files" / "CIDAS--clipseg-rd64-refined"

RES = 64  # the prepared resolution here: drawings made at it reach the masks without a resize


@pytest.fixture(scope="module")
def seg(tiny_profile):
    return load_segmenter(tiny_profile.segmenter, device="cpu")


@pytest.fixture(scope="module")
def rows():
    return cartoon_rows(RES)[:6]  # (drawing, caption, true mask), three drawings and some mirrors


def png(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def oracle(mask) -> np.ndarray:
    return np.asarray(mask) > 0


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def write_folder(folder, rows, *, alpha=()):
    """d0.png, d1.png, ... with captions in metadata.jsonl; the rows in `alpha` as RGBA with the true mask as
    their alpha channel (a cut-out: transparent around the character)."""
    folder.mkdir()
    lines = []
    for i, (im, text, mask) in enumerate(rows):
        if i in alpha:
            im = im.convert("RGBA")
            im.putalpha(mask)
        (folder / f"d{i}.png").write_bytes(png(im))
        lines.append(json.dumps({"file_name": f"d{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


def stored(masks, prep):
    """{row id: (stored mask bool [R, R], source)} over both splits."""
    return {r: (masks.image(s, r), masks.source(s, r)) for s in ("train", "test") for r in getattr(prep, s)["id"]}


def no_segmenter(*a, **k):
    raise AssertionError("the segmenter was loaded although every row has the user's own mask")


# --------------------------------------------------------------------------------------------------
# The user's own masks reach the stored masks unchanged
# --------------------------------------------------------------------------------------------------

def test_alpha_masks_reach_the_stored_masks_as_drawn(tmp_path, rows, tiny_profile, monkeypatch):
    """The oracle as each image's alpha channel: read before compositing, stored with IoU 1, the picture
    composited on white; the segmenter is never loaded."""
    src = write_folder(tmp_path / "drawings", rows, alpha=range(len(rows)))
    prep = prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0.34, progress=False)
    assert len(prep.train) and len(prep.test)
    monkeypatch.setattr(masks_module, "load_segmenter", no_segmenter)
    masks = prepare_masks(prep, tiny_profile, progress=False)
    for i, (_, _, truth) in enumerate(rows):
        got, source = stored(masks, prep)[f"d{i}.png"]
        assert source == "alpha" and iou(got, oracle(truth)) == 1.0 and np.array_equal(got, oracle(truth))
    row = prep.train[0]
    picture, truth = np.asarray(row["image"]), masks.image("train", row["id"])
    assert (picture[~truth] == 255).all()  # transparent pixels were composited on white
    assert masks.latent("train", row["id"]).shape == (RES // 8, RES // 8)


def test_masks_folder_files_come_first_and_reach_the_stored_masks(tmp_path, rows, tiny_profile, seg, capsys):
    """A same-named file in the masks folder (any extension, white on black), first even where the image has
    an alpha channel; alpha where there is no file; the segmenter for the rest; every source recorded."""
    src = write_folder(tmp_path / "drawings", rows, alpha={2, 3})
    masks_dir = tmp_path / "masks"  # beside the image folder, not in it
    masks_dir.mkdir()
    (masks_dir / "d0.png").write_bytes(png(rows[0][2]))
    (masks_dir / "d1.bmp").write_bytes(png(rows[1][2].convert("RGB"), "BMP"))
    (masks_dir / "d3.png").write_bytes(png(rows[3][2]))  # d3's alpha is the same: the file is what is read
    (masks_dir / "unused.png").write_bytes(png(rows[4][2]))
    wrong = Image.new("L", (RES, RES), 0)
    wrong.paste(255, (0, 0, 8, 8))
    im = rows[3][0].convert("RGBA")
    im.putalpha(wrong)  # d3's alpha now says another thing than its mask file
    (src / "d3.png").write_bytes(png(im))
    prep = prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0.34, masks=masks_dir, progress=False)
    assert "1 files in the masks folder name no kept image" in prep.summary() and "unused" in prep.summary()
    masks = prepare_masks(prep, seg, progress=False)
    got = stored(masks, prep)
    expected = {"d0.png": "masks folder", "d1.png": "masks folder", "d2.png": "alpha", "d3.png": "masks folder",
                "d4.png": "segmenter", "d5.png": "segmenter"}
    assert {r: s for r, (_, s) in got.items()} == expected
    for i in range(4):
        assert iou(got[f"d{i}.png"][0], oracle(rows[i][2])) == 1.0
    split = "train" if "d4.png" in prep.train["id"] else "test"
    assert masks.prompt(split, "d4.png") == mask_prompt(rows[4][1]) and masks.prompt("train" if "d0.png" in
                                                                                        prep.train["id"] else "test", "d0.png") is None


def test_a_mask_is_cropped_and_resized_with_its_image(tmp_path, rows, tiny_profile):
    """A wide cut-out: the centre crop takes the drawing and its mask together (IoU 1); a larger one is
    resized with its image (the same as center_square_mask of the larger oracle)."""
    im, text, truth = rows[0]
    wide = Image.new("RGBA", (RES + 32, RES), (0, 0, 0, 0))
    cut = im.convert("RGBA")
    cut.putalpha(truth)
    wide.paste(cut, (16, 0))
    big_im, _, big_truth = cartoon_rows(2 * RES)[0]
    big = big_im.convert("RGBA")
    big.putalpha(big_truth)
    src = tmp_path / "drawings"
    src.mkdir()
    (src / "wide.png").write_bytes(png(wide))
    (src / "big.png").write_bytes(png(big))
    prep = prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0, progress=False)
    masks = prepare_masks(prep, tiny_profile, progress=False)
    assert iou(masks.image("train", "wide.png"), oracle(truth)) == 1.0
    from helpers.data.images import center_square_mask

    assert np.array_equal(masks.image("train", "big.png"), oracle(center_square_mask(big_truth, RES)))


def test_bad_masks_folders_and_files_are_refused_with_reasons(tmp_path, rows):
    src = write_folder(tmp_path / "drawings", rows[:2])
    inside = src / "masks"
    inside.mkdir()
    with pytest.raises(DataSourceError, match="inside the image folder .* would be read as training images"):
        prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0, masks=inside, progress=False)
    shutil.rmtree(inside)
    with pytest.raises(FileNotFoundError, match="the masks folder .MASKS. is not a folder"):
        prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0, masks=tmp_path / "nope", progress=False)
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    (masks_dir / "d0.png").write_bytes(png(Image.new("L", (RES // 2, RES // 2), 255)))
    prep = prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0, masks=masks_dir, progress=False)
    assert list(prep.train["id"]) == ["d1.png"]
    (item, reason), = prep.skipped
    assert item == "d0.png" and reason.startswith("bad mask:") and "must have its image's size" in reason
    (masks_dir / "d0.jpg").write_bytes(png(Image.new("RGB", (RES, RES)), "JPEG"))
    with pytest.raises(DataSourceError, match="two masks for d0"):
        prepare_dataset(src, tmp_path / "data2", resolution=RES, test_fraction=0, masks=masks_dir, progress=False)


# --------------------------------------------------------------------------------------------------
# CLIPSeg's mask: sigmoid, resize, threshold
# --------------------------------------------------------------------------------------------------

def by_hand_pixels(image, config):
    """CLIPSeg's legacy preprocessor file by hand: resize to size x size (its resample), x / 255, (x - mean) / std."""
    x = np.asarray(image.convert("RGB").resize((config["size"],) * 2, resample=config["resample"]))
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy((x - np.float32(config["image_mean"])) / np.float32(config["image_std"])).permute(2, 0, 1)


@pytest.mark.parametrize("files", ["tiny", "CIDAS/clipseg-rd64-refined"])
def test_the_processor_gives_the_hand_computed_pixels(files, tiny_profile, rows, tmp_path):
    """Equal tensors, no torchvision needed: the tiny folder's file, and the full profile's (its values as the
    mirror holds them), both with the tiny tokenizer."""
    folder = Path(tiny_profile.segmenter)
    if files != "tiny":
        folder = shutil.copytree(folder, tmp_path / "clipseg")
        shutil.copy(CIDAS_FILES / "preprocessor_config.json", folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    images = [rows[0][0], rows[1][0].resize((96, 80))]
    got = segmenter_processor(str(folder))(images=images, return_tensors="pt")["pixel_values"]
    assert got.dtype == torch.float32 and got.shape == (2, 3, config["size"], config["size"])
    torch.testing.assert_close(got, torch.stack([by_hand_pixels(im, config) for im in images]), atol=0, rtol=0)


def test_the_mask_is_sigmoid_resize_threshold_of_the_logits(seg, rows):
    images, prompts = [r[0] for r in rows[:3]], [mask_prompt(r[1]) for r in rows[:3]]
    inputs = seg.processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = seg.model(**inputs).logits  # [3, S, S]
    probs = F.interpolate(torch.sigmoid(logits)[:, None], size=(RES, RES), mode="bilinear", align_corners=False)[:, 0]
    got = segment_probabilities(images, prompts, segmenter=seg)  # one batch, as by hand
    assert got.shape == (3, RES, RES) and got.dtype == np.float32 and np.array_equal(got, probs.numpy())
    mask = segment(images, prompts, segmenter=seg, threshold=0.5)
    assert mask.dtype == bool and np.array_equal(mask, probs.numpy() > 0.5)
    batched = segment_probabilities(images, prompts, segmenter=seg, batch_size=2)  # batches of 2 and 1: rounding
    np.testing.assert_allclose(batched, got, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one prompt per image"):
        segment(images, prompts[:2], segmenter=seg)


def test_prompts_are_the_captions_subject_words_or_the_stated_default():
    assert mask_prompt("a cartoon drawing of a boy with brown hair and a yellow shirt") == "boy"
    assert mask_prompt("in space at night") == MASK_SUBJECT_DEFAULT == "a cartoon character"


def test_to_latent_is_the_mean_of_each_8x8_block():
    rng = np.random.default_rng(0)
    mask = rng.random((2, 16, 24)) > 0.6
    by_hand = np.array([[[mask[n, 8 * i:8 * i + 8, 8 * j:8 * j + 8].sum() / 64 for j in range(3)] for i in range(2)]
                        for n in range(2)])
    got = to_latent(mask)
    assert got.dtype == np.float32 and got.shape == (2, 2, 3)
    np.testing.assert_allclose(got, by_hand, rtol=0, atol=1e-7)
    half = np.zeros((8, 16), bool)
    half[:, :4] = True
    assert to_latent(half).tolist() == [[0.5, 0.0]]
    with pytest.raises(ValueError, match="8x8 blocks"):
        to_latent(np.zeros((1, 12, 16), bool))


@pytest.mark.parametrize("fill", [(255, 255, 255), (0, 128, 255)])
def test_fill_background_sets_every_background_pixel_to_the_fill_exactly(rows, fill):
    image, _, truth = rows[0]
    mask = oracle(truth)
    out = np.asarray(fill_background(image, mask, fill))
    assert (out[~mask] == fill).all() and np.array_equal(out[mask], np.asarray(image)[mask])
    with pytest.raises(ValueError, match="mask for a"):
        fill_background(image, mask[:8])


# --------------------------------------------------------------------------------------------------
# Storage: made once, changes detected, missing or stale masks refused
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def prepared(tmp_path, rows):
    src = write_folder(tmp_path / "drawings", rows)
    return src, prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0.34, progress=False)


def test_every_row_is_stored_and_a_segmenter_or_threshold_change_is_detected(prepared, tiny_profile, tmp_path,
                                                                             capsys, monkeypatch):
    _, prep = prepared
    masks = prepare_masks(prep, tiny_profile, progress=False)
    assert [len(masks.ids[s]) for s in ("train", "test")] == [len(prep.train), len(prep.test)]
    assert masks.ids["test"] == list(prep.test["id"]) and masks.coverage("test").shape == (len(prep.test),)
    assert (masks.segmenter, masks.threshold) == (tiny_profile.segmenter, 0.5) and capsys.readouterr().out == ""
    with monkeypatch.context() as m:  # the same settings: read back, no model loaded
        m.setattr(masks_module, "load_segmenter", no_segmenter)
        assert prepare_masks(prep, tiny_profile, progress=False).meta == masks.meta
    higher = prepare_masks(prep, tiny_profile, threshold=0.6, progress=False)
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "threshold 0.5 -> 0.6: making the masks again" in said
    assert higher.threshold == 0.6 and not np.array_equal(higher.coverage("train"), masks.coverage("train"))
    other = shutil.copytree(tiny_profile.segmenter, tmp_path / "other_clipseg")
    prepare_masks(prep, str(other), threshold=0.6, progress=False)
    assert f"segmenter {tiny_profile.segmenter} -> {other}" in capsys.readouterr().out
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # same name, other files
    prepare_masks(prep, str(other), threshold=0.6, progress=False)
    assert f"segmenter {other} -> {other}" in capsys.readouterr().out
    with pytest.raises(MasksError, match="made at threshold 0.6, this run asks for 0.5"):
        load_masks(prep, threshold=0.5)
    with pytest.raises(MasksError, match="made with the segmenter .*other_clipseg, this run asks for"):
        load_masks(prep, segmenter=tiny_profile.segmenter)
    with pytest.raises(ValueError, match="a probability in"):
        prepare_masks(prep, tiny_profile, threshold=1.5)


def test_missing_stale_or_damaged_masks_say_to_run_notebook_01s_mask_cell(prepared, tiny_profile, rows):
    src, prep = prepared
    path = prep.out_dir / MASKS_FILE
    with pytest.raises(MasksMissing, match=f"{path}: no masks here.*Run notebook 01's mask cell"):
        load_masks(prep)
    prepare_masks(prep, tiny_profile, progress=False)
    assert load_masks(prep, segmenter=tiny_profile.segmenter, threshold=0.5).path == path
    (src / "d0.png").write_bytes(png(rows[0][0].rotate(90)))  # the data is prepared again: the masks are stale
    again = prepare_dataset(src, prep.out_dir, resolution=RES, test_fraction=0.34, progress=False)
    with pytest.raises(MasksError, match="holds the masks of other data.*Run notebook 01's mask cell"):
        load_masks(again)
    path.write_bytes(path.read_bytes()[:100])  # a cut copy
    with pytest.raises(MasksError, match="cannot be read as masks.*Run notebook 01's mask cell"):
        load_masks(again)
    assert prepare_masks(again, tiny_profile, progress=False).ids["train"] == list(again.train["id"])  # made anew
    with pytest.raises(KeyError, match="no mask for row 'nope' of train"):
        load_masks(again).image("train", "nope")
