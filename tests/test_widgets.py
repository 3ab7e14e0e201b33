"""helpers.widgets, headless: set widget values, press the buttons, read the panel's kernel-side state."""
import io
from datetime import datetime

import ipywidgets
import numpy as np
import pytest
from _adapters import write_finetuned_adapters
from PIL import Image

from helpers import sample_files, sampling
from helpers.bank import load_models
from helpers.widgets import SamplingPanel, parse_upload


@pytest.fixture(scope="module")
def bank(tiny_profile, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    write_finetuned_adapters(tiny_profile, runs)
    return load_models(tiny_profile, runs, device="cpu", verbose=False)


@pytest.fixture
def panel(bank, reference_image, tmp_path):
    refs = {"ref": reference_image, "flipped": reference_image.transpose(Image.FLIP_LEFT_RIGHT)}
    p = SamplingPanel(bank, refs, out_dir=tmp_path / "samples")
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
    assert list(panel.last_images) == bank.names and len(bank.names) == 4
    for s in panel.last_samples:
        assert (s.reference, s.prompt, s.scale, s.seed, s.steps, s.guidance) == (
            "flipped", "a cartoon drawing of a robot", 0.6, 7, 2, 5.0)
        assert s.image.size == (64, 64)
        assert bytes(panel.result_images[s.model].value)[:4] == b"\x89PNG"  # shown in the panel
    assert panel.progress.value == panel.progress.max == 4 and "4 images" in panel.status.value
    # the same settings through helpers.sampling give the same pixels
    again = sampling.generate(bank, {"flipped": panel.references["flipped"]}, ["a cartoon drawing of a robot"],
                              models=["finetuned-text-aware"], scales=(0.6,), seeds=(7,), steps=2, guidance=5.0,
                              progress=False)[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(panel.last_images["finetuned-text-aware"]))


def test_unticked_models_are_skipped_and_errors_go_to_the_status(panel):
    panel.model_boxes["finetuned-vanilla"].value = False
    panel.model_boxes["pretrained"].value = False
    panel.model_boxes["finetuned-text-aware-neighbour"].value = False
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
    panel.model_boxes["finetuned-text-aware-neighbour"].value = False
    panel.generate_button.click()
    panel.save_button.click()
    assert panel.last_error is None
    assert len(panel.last_saved) == 2 and all(p.is_file() for p in panel.last_saved)
    assert {sample_files.read_settings(p)["model"] for p in panel.last_saved} == {"finetuned-vanilla", "finetuned-text-aware"}
    assert (tmp_path / "samples" / "index.json").is_file() and (tmp_path / "samples" / "index.csv").is_file()


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


def test_thumbnail_buttons_select_their_reference(panel):
    assert len(panel.thumbnails.children) == 2
    button = panel.thumbnails.children[1].children[1]
    assert button.description == "flipped"
    button.click()
    assert panel.reference.value == "flipped"
