"""helpers.data (with helpers.data.images, sources, captions behind it): every input is kept or skipped with a reason, sources fail clearly, prepared data is reused."""
import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import helpers.data.prepare as prepare_module
from helpers.data.prepare import (
    PreparedDataMismatch,
    load_prepared,
    prepare_dataset,
    reference_and_another,
    use_prepared,
)
from helpers.data.sources import DataSourceError
from helpers.tiny.cartoons import draw_character

RES = 32  # training resolution for the hand-made folders (images are 48 px: shorter side >= RES / 2)


def png_bytes(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(mode, left, right, size=(48, 48)):
    """An image whose left half is `left` and right half `right` (colours in `mode`)."""
    im = Image.new(mode, size, right)
    im.paste(Image.new(mode, (size[0] // 2, size[1]), left), (0, 0))
    return im


def prepared_by_id(prep):
    rows = {}
    for split in (prep.train, prep.test):
        for row in split:
            rows[row["id"]] = row
    return rows


def _exif_rotated_jpeg():
    """Stored 64 x 32, left half red, right half blue, EXIF orientation 6 (display = rotate 90 degrees
    clockwise): shown upright it is 32 x 64, red on top, blue below."""
    im = halves("RGB", (255, 0, 0), (0, 0, 255), size=(64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return png_bytes(im, "JPEG", quality=95, exif=exif)


UNUSUAL = {  # file name -> (bytes, mode PIL opens it in)
    "rgba.png": (lambda: png_bytes(halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0))), "RGBA"),
    "la.png": (lambda: png_bytes(halves("LA", (0, 255), (0, 0))), "LA"),
    "palette.png": (lambda: png_bytes(halves("P", 1, 0), transparency=0), "P"),
    "grey.png": (lambda: png_bytes(Image.fromarray(np.tile(np.linspace(0, 255, 48).astype(np.uint8), (48, 1)))), "L"),
    "cmyk.jpg": (lambda: png_bytes(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG"), "CMYK"),
    "sixteen.png": (lambda: png_bytes(Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (48, 1)))),
                    "I;16"),
    "int32.tif": (lambda: png_bytes(Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.int32), (48, 1))), "TIFF"),
                  "I"),
    "exif.jpg": (_exif_rotated_jpeg, "RGB"),
    "wide.png": (lambda: png_bytes(Image.fromarray(np.concatenate(
        [np.full((32, 32, 3), c, np.uint8) for c in ((0, 255, 0), (255, 0, 0), (0, 0, 255))], axis=1))), "RGB"),
}


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unusual")
    for name, (make, mode) in UNUSUAL.items():
        (folder / name).write_bytes(make())
        assert Image.open(folder / name).mode == mode  # the file really is the kind the test claims
    prep = prepare_dataset(folder, tmp_path_factory.mktemp("unusual_out"), resolution=RES, test_fraction=0,
                           progress=False)
    return prep, folder


def test_unusual_images_are_all_kept(unusual):
    prep, _ = unusual
    assert prep.skipped == []
    assert sorted(prep.train["id"]) == sorted(UNUSUAL) and len(prep.test) == 0
    for im in prep.train["image"]:
        assert im.mode == "RGB" and im.size == (RES, RES)


def pixels(unusual, name):
    return np.asarray(prepared_by_id(unusual[0])[name]["image"]).astype(int)


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "palette.png"])
def test_transparency_is_composited_on_white(unusual, name):
    a = pixels(unusual, name)
    # the transparent right half holds black pixels: a plain convert("RGB") would show them
    assert (a[:, -4:] == 255).all(), f"{name}: transparent pixels are not white"
    assert a[:, :4].mean() < 200, f"{name}: the opaque half was lost"


def test_greyscale_keeps_its_values(unusual, tmp_path):
    a = pixels(unusual, "grey.png")
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    source = np.asarray(Image.open(unusual[1] / "grey.png").resize((RES, RES), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(a[..., 0] - source).max() <= 1


def test_cmyk_becomes_rgb(unusual):
    expected = np.asarray(Image.open(unusual[1] / "cmyk.jpg").convert("RGB")).astype(int).mean((0, 1))
    assert np.abs(pixels(unusual, "cmyk.jpg").mean((0, 1)) - expected).max() < 2
    assert expected[0] > 200 and expected[1:].max() < 60  # cyan 0, magenta and yellow full: red


@pytest.mark.parametrize("name", ["sixteen.png", "int32.tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(unusual, name):
    a = pixels(unusual, name)[..., 0]
    # a 0..65535 ramp: clipping at 255 would make nearly every pixel white
    assert a[:, 0].mean() < 20 and a[:, -1].mean() > 235
    assert abs(a.mean() - 127.5) < 10
    assert (np.diff(a.mean(0)) >= -1).all()  # still a left-to-right ramp


def test_exif_orientation_is_applied(unusual):
    a = pixels(unusual, "exif.jpg")
    top, bottom = a[:4].mean((0, 1)), a[-4:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60, "EXIF orientation ignored: red should be on top"
    assert bottom[2] > 200 and bottom[0] < 60


def test_non_square_images_are_centre_cropped(unusual):
    a = pixels(unusual, "wide.png")  # green | red | blue thirds: the centre square is the red third
    assert (a[..., 0] > 200).all() and (a[..., 1:] < 60).all()


def test_broken_inputs_are_skipped_with_reasons(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = png_bytes(draw_character(0, "standing", 0, size=48))
    jpeg = png_bytes(draw_character(1, "waving", 1, size=48), "JPEG")
    (src / "good.png").write_bytes(good)
    (src / "nocaption.png").write_bytes(png_bytes(draw_character(2, "jumping", 2, size=48)))
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("this is text, not a picture")
    (src / "readme.txt").write_text("neither is this")
    (src / "cut.png").write_bytes(good[: len(good) // 2])
    (src / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "small.png").write_bytes(png_bytes(Image.new("RGB", (RES // 2 - 1, 48), (9, 9, 9))))
    (src / "metadata.jsonl").write_text("\n".join([
        json.dumps({"file_name": "good.png", "text": "a scientist"}),
        json.dumps({"file_name": "gone.png", "text": "a file that is not there"}),
        "{not json",
    ]) + "\n")
    prep = prepare_dataset(src, tmp_path / "out", resolution=RES, test_fraction=0, progress=False)
    reasons = dict(prep.skipped)
    expected = {"empty.png": "empty file", "notes.png": "not an image", "readme.txt": "not an image",
                "cut.png": "truncated or corrupt", "cut.jpg": "truncated or corrupt", "small.png": "too small",
                "gone.png": "missing file", "metadata.jsonl line 3": "bad metadata"}
    for item, kind in expected.items():
        assert item in reasons and reasons[item].startswith(kind), (item, reasons.get(item))
    rows = prepared_by_id(prep)
    assert sorted(rows) == ["good.png", "nocaption.png"]
    assert (rows["good.png"]["text"], rows["good.png"]["caption_source"]) == ("a scientist", "metadata.jsonl")
    assert rows["nocaption.png"]["caption_source"] == "placeholder"
    assert "placeholder" in rows["nocaption.png"]["text"]
    # nothing dropped silently: every file is kept or reported
    files = {p.name for p in src.iterdir()} - {"metadata.jsonl"}
    assert files <= set(rows) | set(reasons)
    assert json.loads((tmp_path / "out" / prep.info["splits"] / "skipped.json").read_text()) == [
        {"item": n, "reason": r} for n, r in prep.skipped]


def test_broken_row_of_a_parquet_dataset_is_skipped(tmp_path):
    ims = [png_bytes(draw_character(i, "standing", i % 3, size=48)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": ims[0], "path": None}, {"bytes": b"garbage", "path": None},
                   {"bytes": ims[1], "path": None}, {"bytes": ims[2], "path": None}],
         "text": ["first", "broken", None, "fourth"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    path = tmp_path / "set.parquet"
    ds.to_parquet(str(path))
    prep = prepare_dataset(path, tmp_path / "out", resolution=RES, test_fraction=0, progress=False)
    assert prep.skipped == [("row 1", prep.skipped[0][1])] and prep.skipped[0][1].startswith("not an image")
    rows = prepared_by_id(prep)
    assert sorted(rows) == ["row-00000", "row-00002", "row-00003"]
    assert [rows[i]["caption_source"] for i in sorted(rows)] == ["dataset", "placeholder", "dataset"]


def test_bad_sources_raise_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        prepare_dataset(missing, tmp_path / "out", resolution=RES)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataSourceError, match=str(bad)):
        prepare_dataset(bad, tmp_path / "out", resolution=RES)
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "a.png").write_bytes(b"")
    with pytest.raises(DataSourceError, match="none of its 1 inputs"):
        prepare_dataset(only_broken, tmp_path / "out", resolution=RES)
    with pytest.raises(DataSourceError, match="nobody/no-such-dataset"):  # offline (conftest): the Hub is not reached
        prepare_dataset("nobody/no-such-dataset", tmp_path / "out", resolution=RES)
    with pytest.raises(FileNotFoundError, match="not_here/"):
        prepare_dataset("not_here/", tmp_path / "out", resolution=RES)
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_dataset(only_broken, tmp_path / "out", resolution=30)


def test_missing_captions_come_from_a_blip_model(tmp_path):
    """A tiny random BLIP, saved and loaded like the Hub one, goes through the captioning path."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    blip = tmp_path / "blip"
    blip.mkdir()
    (blip / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "drawing",
                                               "of", "cat", "green"]) + "\n")
    tok = BertTokenizer(str(blip / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                encoder_hidden_size=32, bos_token_id=tok.bos_token_id, pad_token_id=0, sep_token_id=3,
                max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(blip)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(blip)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.png").write_bytes(png_bytes(draw_character(i, "waving", i, size=48)))
    prep = prepare_dataset(src, tmp_path / "out", resolution=RES, test_fraction=0, captioner=str(blip), progress=False)
    assert list(prep.train["caption_source"]) == ["blip", "blip"]
    words = set(tok.vocab) - set(tok.all_special_tokens)
    for caption in prep.train["text"]:
        assert caption and set(caption.split()) <= words  # decoded from the model's vocabulary


def test_prepared_data_is_reused_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.png").write_bytes(png_bytes(draw_character(i, "standing", i % 3, size=48)))
    out = tmp_path / "out"
    first = prepare_dataset(src, out, resolution=RES, test_fraction=0.25, progress=False)
    stamp = (out / "prepared.json").stat().st_mtime_ns

    def no_decoding(*a, **k):
        raise AssertionError("prepare_dataset decoded images although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "decode_image_and_alpha", no_decoding)
        again = prepare_dataset(src, out, resolution=RES, test_fraction=0.25, progress=False)
        loaded = load_prepared(out)
    assert (out / "prepared.json").stat().st_mtime_ns == stamp
    for p in (again, loaded):
        assert list(p.train["id"]) == list(first.train["id"]) and list(p.test["id"]) == list(first.test["id"])
        assert list(p.train["text"]) == list(first.train["text"]) and p.skipped == first.skipped
    (src / "0.png").write_bytes(png_bytes(draw_character(5, "jumping", 1, size=48)))
    changed = prepare_dataset(src, out, resolution=RES, test_fraction=0.25, progress=False)
    before, after = prepared_by_id(first)["0.png"]["hash"], prepared_by_id(changed)["0.png"]["hash"]
    assert before != after


# --------------------------------------------------------------------------------------------------
# The prepared folder as the contract between the notebooks (helpers.data.prepare.use_prepared)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_prepared(tmp_path_factory):
    """A user's 12 images (6 drawings + mirrors) prepared as notebook 01 does, at the tiny resolution."""
    from _own_data import own_images

    root = tmp_path_factory.mktemp("own")
    captions = own_images(root / "my_drawings")
    prep = prepare_dataset(root / "my_drawings", root / "data", resolution=64, test_fraction=0.1, progress=False)
    return prep, captions, root


def test_use_prepared_reads_own_data_as_it_is_and_says_it_is_not_the_profiles(tiny_profile, own_prepared, capsys,
                                                                              monkeypatch):
    prep, captions, root = own_prepared
    monkeypatch.setattr(prepare_module, "prepare_dataset", lambda *a, **k: pytest.fail("re-prepared notebook 01's folder"))
    got = use_prepared(root / "data", tiny_profile, resolution=64, dataset=root / "my_drawings")
    assert sorted(list(got.train["text"]) + list(got.test["text"])) == sorted(captions.values())
    assert f"Using the data notebook 01 prepared in {root / 'data'}: {root / 'my_drawings'}" in capsys.readouterr().out


@pytest.mark.parametrize("asked, words", [({"resolution": 128}, "resolution 128 (the folder has 64)"),
                                          ({"test_fraction": 0.25}, "test fraction 0.25 (the folder has 0.1)"),
                                          ({"dataset": "Norod78/RickAndMorty-HorizontalMirror-blip-captions"},
                                           "source 'Norod78/RickAndMorty")])
def test_use_prepared_stops_when_other_settings_are_asked(tiny_profile, own_prepared, asked, words):
    _, _, root = own_prepared
    manifest = (root / "data" / "prepared.json").read_bytes()
    with pytest.raises(PreparedDataMismatch) as err:
        use_prepared(root / "data", tiny_profile, **asked)
    message = str(err.value)
    assert message.startswith(f"{root / 'data'} holds data prepared from {root / 'my_drawings'} at 64 px")
    assert words in message and "re-run notebook 01" in message and "another folder" in message
    assert (root / "data" / "prepared.json").read_bytes() == manifest


def test_use_prepared_prepares_a_missing_folder_from_the_profile_and_says_so(tiny_profile, tmp_path, capsys):
    prep = use_prepared(tmp_path / "data", tiny_profile, progress=False)
    assert prep.info["source"] == tiny_profile.dataset and prep.info["resolution"] == tiny_profile.resolution
    assert capsys.readouterr().out.startswith(f"No prepared data in {tmp_path / 'data'} (notebook 01 has not run")


def test_use_prepared_refuses_a_folder_of_images(tiny_profile, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png_bytes(draw_character(0, "waving", 0, size=48)))
    with pytest.raises(PreparedDataMismatch, match=r"pics is not a prepared data folder.*a\.png.*DATASET"):
        use_prepared(tmp_path / "pics", tiny_profile)
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["a.png"]


def test_a_single_test_group_still_gives_two_drawings_to_compare(own_prepared):
    """12 own images: the test split is one mirror pair, so 'another drawing' comes from training."""
    prep, _, _ = own_prepared
    assert len(prep.test) == 2 and len(set(prep.test["group"])) == 1
    a, b = reference_and_another(prep)
    assert a["id"] == prep.test[0]["id"] and b["group"] != a["group"] and b["id"] in list(prep.train["id"])


def test_rerunning_01_with_other_settings_says_what_it_replaced(tmp_path):
    from _own_data import own_images

    own_images(tmp_path / "pics", n_drawings=3)
    prepare_dataset(tmp_path / "pics", tmp_path / "data", resolution=RES, test_fraction=0, progress=False)
    again = prepare_dataset(tmp_path / "pics", tmp_path / "data", resolution=2 * RES, test_fraction=0, progress=False)
    assert f"This replaced the data prepared there before: {tmp_path / 'pics'} at {RES} px" in again.summary()


# --------------------------------------------------------------------------------------------------
# Faults: a full disk, a killed writer, two writers, a damaged split (issue 25)
# --------------------------------------------------------------------------------------------------


def _prepared_here(tmp_path, n_drawings=3):
    """6 own images (3 mirror pairs) prepared at RES with a test split (1 pair): two splits to write."""
    from _own_data import own_images

    own_images(tmp_path / "pics", n_drawings=n_drawings)
    first = prepare_dataset(tmp_path / "pics", tmp_path / "data", resolution=RES, test_fraction=0.25, progress=False)
    assert len(first.train) and len(first.test)
    return first, tmp_path / "data"


def test_a_failed_re_preparation_keeps_the_old_one_and_use_prepared_uses_it(tiny_profile, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from helpers.support.disk import DiskFull

    first, data = _prepared_here(tmp_path)
    manifest = (data / "prepared.json").read_bytes()
    real_save, written = datasets.Dataset.save_to_disk, []

    def disk_fills(self, path, *a, **k):  # the train split is written; the disk fills half-way through the test split
        written.append(path)
        if len(written) == 1:
            return real_save(self, path, *a, **k)
        Path(path).mkdir(parents=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "save_to_disk", disk_fills)
        with pytest.raises(DiskFull) as err:
            prepare_dataset(tmp_path / "pics", data, resolution=2 * RES, test_fraction=0.25, progress=False)
    assert len(written) == 2 and "disk is full" in str(err.value) and str(data) in str(err.value)
    assert "what was complete before is kept" in str(err.value)
    assert (data / "prepared.json").read_bytes() == manifest  # the old preparation, whole
    assert not [p.name for p in data.iterdir() if p.name.startswith(".prepare-")]  # its temporary went
    old = load_prepared(data)
    assert list(old.train["id"]) == list(first.train["id"]) and list(old.test["id"]) == list(first.test["id"])
    assert old.train[0]["image"].size == (RES, RES) and old.skipped == first.skipped
    # the next run of notebook 03-05 reads the user's data, never the profile's
    monkeypatch.setattr(prepare_module, "prepare_dataset", lambda *a, **k: pytest.fail("prepared over the old data"))
    used = use_prepared(data, tiny_profile, announce=False)
    assert used.info["source"] == str(tmp_path / "pics") and list(used.train["id"]) == list(first.train["id"])


def test_a_re_preparation_replaces_the_old_one_whole(tmp_path):
    first, data = _prepared_here(tmp_path)
    old_splits = data / first.info["splits"]
    again = prepare_dataset(tmp_path / "pics", data, resolution=2 * RES, test_fraction=0.25, progress=False)
    assert again.train[0]["image"].size == (2 * RES, 2 * RES) and again.info["splits"] != first.info["splits"]
    assert not old_splits.exists()  # the old splits went once the new manifest was in place
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == [again.info["splits"], "prepared.json"]


@pytest.mark.parametrize("trace", ["train", "skipped.json", "prepared-20240101-000000", ".prepare-k2x9",
                                   "train_features.safetensors"])
def test_use_prepared_never_prepares_the_profiles_data_over_traces_of_another(tiny_profile, tmp_path, trace,
                                                                                monkeypatch):
    data = tmp_path / "data"
    (data / trace).parent.mkdir(parents=True)
    if "." in trace.lstrip("."):
        (data / trace).write_text("left by an interrupted preparation")
    else:
        (data / trace / "train").mkdir(parents=True)
    monkeypatch.setattr(prepare_module, "prepare_dataset", lambda *a, **k: pytest.fail("prepared over the traces"))
    with pytest.raises(PreparedDataMismatch) as err:
        use_prepared(data, tiny_profile)
    message = str(err.value)
    assert str(data) in message and trace in message and "notebook 01" in message and "delete" in message
    assert (data / trace).exists()


def test_a_killed_preparation_leaves_nothing_for_good(tmp_path):
    first, data = _prepared_here(tmp_path)
    (data / ".prepare-k2x9" / "train").mkdir(parents=True)  # kill -9 while the splits were being written
    (data / ".prepare-k2x9" / "train" / "data-00000-of-00001.arrow").write_bytes(b"\0" * 100)
    (data / "prepared-20240101-000000").mkdir()  # ... or between the new splits' rename and the new manifest
    again = prepare_dataset(tmp_path / "pics", data, resolution=RES, test_fraction=0.25, progress=False)
    assert list(again.train["id"]) == list(first.train["id"])  # the same preparation, reused
    assert sorted(p.name for p in data.iterdir() if p.name != ".lock.json") == sorted([first.info["splits"], "prepared.json"])


def test_a_second_preparation_of_one_folder_stops_at_once(tiny_profile, tmp_path):
    import os
    import subprocess
    import sys
    import textwrap
    import time

    from _own_data import own_images

    from helpers.support.lock import FolderInUse

    own_images(tmp_path / "pics", n_drawings=2)
    data = tmp_path / "data"
    code = textwrap.dedent(f"""
        import time, datasets
        def slow(self, path, *a, **k):
            print("writing", flush=True)
            time.sleep(60)
        datasets.Dataset.save_to_disk = slow
        from helpers.data.prepare import prepare_dataset
        prepare_dataset({str(tmp_path / "pics")!r}, {str(data)!r}, resolution={RES}, test_fraction=0, progress=False)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "WORLD_SIZE": "1"})
    try:
        assert p.stdout.readline().strip() == "writing"
        start = time.monotonic()
        with pytest.raises(FolderInUse) as err:
            prepare_dataset(tmp_path / "pics", data, resolution=2 * RES, test_fraction=0, progress=False)
        assert f"pid {p.pid}" in str(err.value) and "preparing data" in str(err.value)
        with pytest.raises(FolderInUse):  # a reader that finds no prepared data yet waits for no one either
            use_prepared(data, tiny_profile)
        assert time.monotonic() - start < 5
    finally:
        p.kill()
        p.wait()


def test_a_cut_split_file_says_rerun_notebook_01_naming_it(tiny_profile, tmp_path):
    import os

    first, data = _prepared_here(tmp_path)
    arrow = next((data / first.info["splits"] / "train").glob("*.arrow"))
    os.truncate(arrow, arrow.stat().st_size * 2 // 3)
    for read in (lambda: load_prepared(data), lambda: use_prepared(data, tiny_profile)):
        with pytest.raises(PreparedDataMismatch) as err:
            read()
        message = str(err.value)
        assert str(data) in message and str(arrow.parent) in message and "rerun notebook 01" in message
        assert "prepare_dataset" in message and "Expected to be able to read" in message
    again = prepare_dataset(tmp_path / "pics", data, resolution=RES, test_fraction=0.25, progress=False)  # 01 again
    assert list(again.train["id"]) == list(first.train["id"]) and len(load_prepared(data).train) == len(first.train)


def test_a_folder_of_the_older_layout_is_read_and_replaced_whole(tmp_path):
    first, data = _prepared_here(tmp_path)
    splits = data / first.info["splits"]
    for p in splits.iterdir():  # as prepared before the prepared-<time> folders: splits beside prepared.json
        p.rename(data / p.name)
    splits.rmdir()
    manifest = json.loads((data / "prepared.json").read_text())
    del manifest["splits"]
    (data / "prepared.json").write_text(json.dumps(manifest))
    old = load_prepared(data)
    assert list(old.train["id"]) == list(first.train["id"]) and old.skipped == first.skipped
    again = prepare_dataset(tmp_path / "pics", data, resolution=2 * RES, test_fraction=0.25, progress=False)
    assert sorted(p.name for p in data.iterdir()) == [again.info["splits"], "prepared.json"]


def test_a_reader_that_meets_a_swap_reads_the_new_preparation(tmp_path, monkeypatch):
    """Readers take no lock: when the folder it was about to read is swapped out under it, it reads again."""
    first, data = _prepared_here(tmp_path)
    real, calls = datasets.load_from_disk, []

    def swap_first(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:  # another writer commits a new preparation and deletes the old one just now
            prepare_dataset(tmp_path / "pics", data, resolution=2 * RES, test_fraction=0.25, progress=False)
        return real(path, *a, **k)

    monkeypatch.setattr(datasets, "load_from_disk", swap_first)
    got = load_prepared(data)
    assert first.info["splits"] in calls[0] and got.info["splits"] != first.info["splits"]
    assert got.train[0]["image"].size == (2 * RES, 2 * RES)
