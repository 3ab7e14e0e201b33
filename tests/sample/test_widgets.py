"""helpers.sample.widgets, headless: set widget values, press the buttons, read the panel's kernel-side state."""
import html
import io
from datetime import datetime

import ipywidgets
import numpy as np
import pytest
from _adapters import write_finetuned_adapters
from PIL import Image

import helpers.sample.mask_view as mask_view_module
from helpers.data.masks import load_segmenter, mask_prompt, prepare_masks, segment
from helpers.sample.bank import load_models
from helpers.sample.generate import generate
from helpers.sample.references import held_out_references
from helpers.sample.registry import MODEL_NAMES, MODELS, masked_twins, opt_in_note
from helpers.sample.saved import png_settings
from helpers.sample.uploads import parse_upload
from helpers.sample.widgets import SamplingPanel


@pytest.fixture(scope="module")
def bank(tiny_profile, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    write_finetuned_adapters(tiny_profile, runs)
    return load_models(tiny_profile, runs, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def segmenter(tiny_profile):
    return load_segmenter(tiny_profile.segmenter, device="cpu")


@pytest.fixture
def segment_calls(monkeypatch):
    """Every (images, prompts) the panel hands to CLIPSeg (helpers.data.masks.segment, still called)."""
    calls = []

    def spy(images, prompts, **kwargs):
        calls.append((list(images), list(prompts)))
        return segment(images, prompts, **kwargs)
    monkeypatch.setattr(mask_view_module, "segment", spy)
    return calls


@pytest.fixture
def panel(bank, reference_image, tmp_path):
    refs = {"ref": reference_image, "flipped": reference_image.transpose(Image.FLIP_LEFT_RIGHT)}
    captions = {"ref": "a cartoon drawing of a boy", "flipped": "a cartoon drawing of a boy, mirrored"}
    p = SamplingPanel(bank, refs, out_dir=tmp_path / "samples", captions=captions, scale=0.7)
    p.steps.value = 2
    return p


def png(color=(10, 200, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_generate_button_gives_one_image_per_model(panel, bank):
    panel.select("flipped")
    panel.prompt.value = "a cartoon drawing of a robot"
    panel.scale.value, panel.seed.value, panel.guidance.value = 0.6, 7, 5.0
    panel.generate_button.click()
    assert panel.last_error is None, panel.last_error
    assert list(panel.last_images) == bank.names and len(bank.names) == 7
    for s in panel.last_samples:
        assert (s.reference, s.prompt, s.scale, s.seed, s.steps, s.guidance) == (
            "flipped", "a cartoon drawing of a robot", 0.6, 7, 2, 5.0)
        assert s.image.size == (64, 64)
        assert bytes(panel.result_images[s.model].value)[:4] == b"\x89PNG"  # shown in the panel
    assert panel.progress.value == panel.progress.max == 7 * 2 and "7 images" in panel.status.value  # 7 models x 2 steps
    assert {s.sampler for s in panel.last_samples} == {"DDIMScheduler"} and "DDIMScheduler" in panel.status.value
    # the same settings through helpers.sample.generate give the same pixels
    again = generate(bank, {"flipped": panel.references["flipped"]}, ["a cartoon drawing of a robot"],
                              models=["finetuned-text-aware"], scales=(0.6,), seeds=(7,), steps=2, guidance=5.0,
                              progress=False)[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(panel.last_images["finetuned-text-aware"]))


def test_unticked_models_are_skipped_and_errors_go_to_the_status(panel):
    panel.model_boxes["finetuned-vanilla"].value = False
    panel.model_boxes["pretrained"].value = False
    for name in ("finetuned-text-aware-neighbour", *masked_twins()):  # the opt-in runs
        panel.model_boxes[name].value = False
    panel.generate_button.click()
    assert list(panel.last_images) == ["finetuned-text-aware"]
    panel.model_boxes["finetuned-text-aware"].value = False
    panel.generate_button.click()
    assert "no model ticked" in panel.last_error and "no model ticked" in panel.status.value
    assert not panel.generate_button.disabled  # the panel stays usable


def test_save_button_writes_images_with_settings(panel, tmp_path):
    panel.save_button.click()
    assert "nothing to save yet" in panel.last_error
    panel.model_boxes["pretrained"].value = False
    for name in ("finetuned-text-aware-neighbour", *masked_twins()):  # the opt-in runs
        panel.model_boxes[name].value = False
    panel.generate_button.click()
    panel.save_button.click()
    assert panel.last_error is None
    assert len(panel.last_saved) == 2 and all(p.is_file() for p in panel.last_saved)
    assert {png_settings(p)["model"] for p in panel.last_saved} == {"finetuned-vanilla", "finetuned-text-aware"}
    assert (tmp_path / "samples" / "index.json").is_file() and (tmp_path / "samples" / "index.csv").is_file()


def test_progress_bar_counts_denoising_steps(panel):
    seen = []
    panel.progress.observe(lambda change: seen.append(change["new"]), names="value")
    panel.steps.value = 3
    panel.model_boxes["pretrained"].value = False
    for name in ("finetuned-text-aware-neighbour", *masked_twins()):  # the opt-in runs
        panel.model_boxes[name].value = False
    panel.generate_button.click()
    assert panel.last_error is None and panel.progress.max == 2 * 3
    assert [v for v in seen if v] == [1, 2, 3, 4, 5, 6]  # one tick per denoising step, both models


def test_scale_starts_at_the_notebooks_value_and_settings_follow_the_widgets(panel, bank):
    assert panel.scale.value == 0.7 and "IP scale: 0.7" in panel.settings_view.value
    assert "sampler: DDIMScheduler, 2 steps" in panel.settings_view.value
    panel.scale.value = 1.2
    panel.prompt.value = "a robot in space"
    assert "IP scale: 1.2" in panel.settings_view.value and "prompt: a robot in space" in panel.settings_view.value
    panel.select("flipped")
    assert "reference: flipped: a cartoon drawing of a boy, mirrored" in panel.settings_view.value
    assert SamplingPanel(bank, {}).scale.value == 1.0  # no SCALE given: the slider's default


def test_parse_upload_reads_ipywidgets_7_and_8_values():
    v7 = {"drawing.png": {"metadata": {"name": "drawing.png", "type": "image/png", "size": 99}, "content": png()}}
    v8 = ({"name": "drawing.png", "type": "image/png", "size": 99, "last_modified": datetime.now(),
           "content": memoryview(png())},)
    for value in (v7, v8):
        (name, image), = parse_upload(value)
        assert name == "drawing.png" and image.size == (40, 30) and image.getpixel((0, 0)) == (10, 200, 30)
    assert parse_upload(()) == [] and parse_upload({}) == []
    with pytest.raises(ValueError, match="notes.txt.*not an image"):
        parse_upload(({"name": "notes.txt", "content": memoryview(b"hello")},))
    assert parse_upload({"colab.png": png()})[0][0] == "colab.png"  # google.colab.files.upload()'s {name: bytes}


@pytest.mark.parametrize("value", [
    {"phone.jpg": {"metadata": {"name": "phone.jpg", "size": 3_400_000}, "content": b""}},  # ipywidgets 7 in Colab
    ({"name": "phone.jpg", "size": 3_400_000, "content": memoryview(b"")},),  # ipywidgets 8
    ({"name": "phone.jpg", "size": 3_400_000, "content": memoryview(png())},),  # cut short
])
def test_an_upload_that_arrives_empty_names_the_file_and_the_1mb_limit(value, panel):
    with pytest.raises(ValueError, match=r"upload of 'phone.jpg' arrived (empty|cut short).*about 1 MB.*Path box"):
        parse_upload(value)
    panel._on_upload({"new": value})
    assert "phone.jpg" in panel.last_error and "1 MB" in panel.status.value
    assert panel.reference.value == "ref"  # nothing changed


def test_a_path_becomes_the_selected_reference(panel, tmp_path):
    (tmp_path / "drive").mkdir()
    Image.new("RGB", (50, 40), (1, 2, 3)).save(tmp_path / "drive" / "big.png")
    panel.path.value = str(tmp_path / "drive" / "big.png")
    panel.path_button.click()
    assert panel.last_error is None and panel.reference.value == "upload:big.png"
    assert panel.references["upload:big.png"].getpixel((0, 0)) == (1, 2, 3)
    panel.path.value = str(tmp_path / "nothing.png")
    panel.path_button.click()
    assert "nothing.png: no such file" in panel.last_error
    (tmp_path / "notes.png").write_text("not an image")
    panel.path.value = str(tmp_path / "notes.png")
    panel.path_button.click()
    assert "notes.png: not an image" in panel.last_error


def test_colab_upload_button_only_in_colab(panel, monkeypatch):
    assert panel.colab_button.layout.display == "none"  # not in Colab here
    panel.colab_button.click()
    assert "only available in Google Colab" in panel.last_error
    import sys
    import types

    files = types.SimpleNamespace(upload=lambda: {"photo.png": png((9, 9, 9), (1200, 900))})
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(files=files))
    monkeypatch.setitem(sys.modules, "google.colab.files", files)
    assert panel.colab_upload() == ["upload:photo.png"] and panel.reference.value == "upload:photo.png"


def test_upload_becomes_the_selected_reference(panel):
    content = png((250, 0, 0))
    if int(ipywidgets.__version__.split(".")[0]) >= 8:
        value = ({"name": "mine.png", "type": "image/png", "size": len(content), "last_modified": datetime.now(),
                  "content": memoryview(content)},)
    else:
        value = {"mine.png": {"metadata": {"name": "mine.png", "type": "image/png", "size": len(content)},
                              "content": content}}
    panel.upload.set_trait("value", value)  # as the browser does (read-only from Python in 7); fires the observer
    assert panel.last_error is None and panel.reference.value == "upload:mine.png"
    panel._on_upload({"new": {"other.png": {"metadata": {}, "content": png((0, 0, 250))}}})  # 7's shape, any version
    assert panel.reference.value == "upload:other.png" and panel.references["upload:other.png"].getpixel((0, 0)) == (0, 0, 250)
    assert bytes(panel.preview.value)[:4] == b"\x89PNG"
    panel.generate()
    assert {s.reference for s in panel.last_samples} == {"upload:other.png"}
    panel._on_upload({"new": ({"name": "bad.png", "content": memoryview(b"xx")},)})
    assert "bad.png" in panel.last_error


def test_thumbnails_show_captions_and_select_their_reference(panel):
    assert len(panel.thumbnails.children) == 2
    image, button, caption = panel.thumbnails.children[1].children
    assert "a cartoon drawing of a boy, mirrored" in caption.value and "flipped" not in caption.value
    assert [label for label, _ in panel.reference.options][1] == "a cartoon drawing of a boy, mirrored (flipped)"
    button.click()
    assert panel.reference.value == "flipped"


def test_captions_come_with_held_out_references(bank, tiny_profile, tiny_data):
    refs, _ = held_out_references(tiny_profile, tiny_data[2], n=2)
    panel = SamplingPanel(bank, refs)
    assert set(panel.captions) == set(refs) and all(c.startswith("a cartoon drawing") for c in panel.captions.values())


EVIL = "<script>alert(1)</script> & co"


def test_user_strings_are_escaped_in_the_panels_html(bank, reference_image, segmenter, monkeypatch):
    from helpers.sample import widgets
    from helpers.sample.bank import ModelBank

    own = ModelBank(bank.pipe, bank.profile, {EVIL: bank.models["pretrained"]}, {"<b>mine</b> & co": "no <i>file</i>"})
    try:
        panel = SamplingPanel(own, {"ref": reference_image}, captions={"ref": "a <u>boy</u> & a dog"},
                              segmenter=segmenter)
        panel.add_reference("<img src=x onerror=alert(1)>.png", reference_image)
        panel.concept.value = "<b>hat</b> & co"  # an upload's mask words
        panel.show_mask.value = panel.remove_background.value = True
        panel.prompt.value = "a <script>robot</script> & a cat"
        panel.steps.value = 1
        panel.generate_button.click()
        assert panel.last_error is None, panel.last_error
    finally:
        bank.active = None  # the shared pipeline now holds another model's tensors: let the next use() swap
    html_values = {"notes": panel.notes.value, "label": panel.result_labels[EVIL].value, "status": panel.status.value,
                   "settings": panel.settings_view.value, "caption": panel.thumbnails.children[0].children[2].value,
                   "mask": panel.mask_note.value}
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html_values["label"]
    assert "&lt;b&gt;mine&lt;/b&gt; &amp; co is not available: no &lt;i&gt;file&lt;/i&gt;" in html_values["notes"]
    assert "reference upload:&lt;img src=x onerror=alert(1)&gt;.png" in html_values["status"]
    assert "a &lt;script&gt;robot&lt;/script&gt; &amp; a cat" in html_values["settings"]
    assert "a &lt;u&gt;boy&lt;/u&gt; &amp; a dog" in html_values["caption"]
    for where in ("mask", "settings", "status"):
        assert "&#x27;&lt;b&gt;hat&lt;/b&gt; &amp; co&#x27;" in html_values[where], where
    for where, value in html_values.items():
        assert not any(tag in value for tag in ("<script", "<img", "<u>", "<i>file", "<b>mine", "<b>hat", " & ")), where
    panel._say("Saved to /tmp/a<b>&c")  # every status line goes through _say
    assert panel.status.value == "Saved to /tmp/a&lt;b&gt;&amp;c"
    # a model name as a checkbox description: plain text on ipywidgets 8, HTML on 7 (Colab), so escaped there
    assert panel.model_boxes[EVIL].description == (html.escape(EVIL) if widgets._HTML_DESCRIPTIONS else EVIL)
    monkeypatch.setattr(widgets, "_HTML_DESCRIPTIONS", True)
    assert widgets._description(EVIL) == "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"


def test_the_panel_notes_untrained_opt_in_models_in_one_line(bank, reference_image, segmenter):
    """A headline model missing: its own note. The neighbour and masked runs, not trained: one note naming them
    and the notebook 03 setting that trains each (bank.missing still holds every one)."""
    from helpers.sample.bank import ModelBank

    opt_in = [n for n in MODEL_NAMES if MODELS[n].opt_in]
    missing = {"finetuned-vanilla": "no adapter at runs/vanilla", **{n: f"no adapter for {n}" for n in opt_in}}
    own = ModelBank(bank.pipe, bank.profile, {"pretrained": bank.models["pretrained"]}, missing, opt_in)
    panel = SamplingPanel(own, {"ref": reference_image}, segmenter=segmenter)
    notes = panel.notes.value.split("<br>")
    assert notes[-2:] == ["<i>finetuned-vanilla is not available: no adapter at runs/vanilla</i>",
                          f"<i>{html.escape(opt_in_note(opt_in))}</i>"]
    assert len(opt_in) == 4 and all(f"{n} (" in notes[-1] for n in opt_in) and "TRAIN_NEIGHBOUR = True" in notes[-1]
    assert own.missing == missing


# The reference's mask: shown over the preview, and the background removed before the adapters see it


def test_show_mask_gives_a_test_references_stored_mask_and_segments_an_upload(bank, tiny_profile, tiny_data, segmenter,
                                                                              segment_calls):
    prep, _, folder = tiny_data
    masks = prepare_masks(prep, segmenter, progress=False)  # what notebook 01 stores, in the same folder
    refs, _ = held_out_references(tiny_profile, folder, n=2)
    panel = SamplingPanel(bank, refs, masks=masks, segmenter=segmenter)
    first = next(iter(refs))
    assert panel.preview_image() is panel.references[first]  # nothing ticked: the plain reference
    panel.show_mask.value = True
    assert panel.last_error is None, panel.last_error
    stored = masks.image("test", first)
    assert np.array_equal(panel.last_mask, stored) and 0 < stored.mean() < 1
    assert segment_calls == []  # read from the file, not segmented again
    assert "mask: stored by notebook 01 (segmenter)" in panel.mask_note.value and f"{stored.mean():.0%}" in panel.mask_note.value
    shown, plain = np.asarray(panel.preview_image()), np.asarray(panel.references[first])
    assert np.array_equal(shown[stored], plain[stored]) and (shown[~stored] != plain[~stored]).any()  # tinted off it

    # your own image (another size): CLIPSeg now, on the prompt's subject words, then on the Concept box's
    mine = panel.references[first].resize((80, 56)).transpose(Image.FLIP_LEFT_RIGHT)
    panel.prompt.value = "a cartoon drawing of a robot in space"
    panel.add_reference("mine.png", mine)
    assert panel.last_error is None, panel.last_error
    assert segment_calls[-1][1] == ["robot"] and segment_calls[-1][0][0].size == (80, 56)
    by_hand = segment([mine], ["robot"], segmenter=segmenter, threshold=masks.threshold)[0]
    assert panel.last_mask.shape == (56, 80) and np.array_equal(panel.last_mask, by_hand)
    assert "on &#x27;robot&#x27;" in panel.mask_note.value
    panel.concept.value = "robot arm"
    assert segment_calls[-1][1] == ["robot arm"] and "robot arm" in panel.last_mask_source
    panel.concept.value, panel.prompt.value = "", "in space"  # no subject named: the stated default
    assert segment_calls[-1][1] == ["a cartoon character"]
    calls = len(segment_calls)
    panel.select(first)
    panel.select("upload:mine.png")  # kept per reference and words: not segmented again
    assert len(segment_calls) == calls and np.array_equal(panel.reference_mask(first), stored)

    # without stored masks, a test reference is segmented on its caption's subject words, as notebook 01 does
    alone = SamplingPanel(bank, refs, segmenter=segmenter)
    alone.show_mask.value = True
    assert segment_calls[-1][1] == [mask_prompt(refs.captions[first])] and alone.last_mask.shape == stored.shape


def test_background_removed_gives_every_model_the_reference_with_its_background_painted_white(panel, bank, segmenter,
                                                                                             monkeypatch):
    panel.segmenter = segmenter
    seen = []
    features = bank.image_features
    monkeypatch.setattr(bank, "image_features", lambda image: seen.append(image.copy()) or features(image))
    for name, box in panel.model_boxes.items():  # two models: the pretrained adapter and a fine-tuned one
        box.value = name in ("pretrained", "finetuned-text-aware")
    panel.remove_background.value = True
    assert "background: removed (mask clipseg on &#x27;boy&#x27;, threshold 0.5)" in panel.settings_view.value
    with_fill = panel.generate()
    mask, reference = panel.last_mask, np.asarray(panel.references["ref"])
    assert mask.shape == reference.shape[:2] and 0 < mask.mean() < 1
    assert (reference[~mask] != 255).any()  # the drawing's own background is not white
    assert len(seen) == 2  # one pipeline call per ticked model, the pretrained adapter among them
    for image in seen:
        got = np.asarray(image)
        assert (got[~mask] == 255).all() and np.array_equal(got[mask], reference[mask])
    assert {s.model for s in with_fill} == {"pretrained", "finetuned-text-aware"}
    assert {s.background for s in with_fill} == {"removed"} and "background removed" in panel.status.value
    assert np.array_equal(np.asarray(with_fill[0].reference_image), np.asarray(seen[0]))

    seen.clear()
    panel.remove_background.value = False
    without = panel.generate()
    assert all(np.array_equal(np.asarray(image), reference) for image in seen) and len(seen) == 2
    assert {s.background for s in without} == {"kept"} and "background" not in panel.settings_view.value
    assert not np.array_equal(np.asarray(without[0].image), np.asarray(with_fill[0].image))  # the fill reached the picture
