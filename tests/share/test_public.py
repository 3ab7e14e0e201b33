"""helpers.share.public: an upload folder built from a real (tiny) training run names no local path: not the
folders the run wrote and read, not the home folder the tiny models live in; its adapter keeps every tensor."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers.share.hub import build_upload_folder
from helpers.share.public import public_name, public_settings
from helpers.train.config import TrainConfig
from helpers.train.loop import train


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    _, _, data_dir = tiny_data
    out = tmp_path_factory.mktemp("private run") / "runs" / "text_aware"
    train(TrainConfig(output_dir=str(out), profile="tiny", data_dir=str(data_dir), max_steps=2, checkpoint_every=1),
          progress=False)
    return out


def every_text(folder: Path) -> dict[str, str]:
    """Every text an upload folder holds: its text files, the adapter's metadata, the PNGs' text chunks."""
    texts = {}
    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                texts[path.name] = json.dumps(f.metadata())
        elif path.suffix == ".png":
            with Image.open(path) as im:
                texts[path.name] = json.dumps(dict(getattr(im, "text", {}) or {}))
        else:
            texts[path.name] = path.read_text()
    return texts


def test_an_upload_folder_names_no_local_path(trained, tmp_path_factory, tmp_path):
    config = json.loads((trained / "config.json").read_text())
    private = [str(tmp_path_factory.getbasetemp()), str(Path.home())]
    assert any(p in json.dumps(config) for p in private)  # the run itself records where it ran: the test can fail
    folder = build_upload_folder(trained, tmp_path / "upload", samples=Image.new("RGB", (64, 64)), repo_id="me/it")
    texts = every_text(folder)
    assert set(texts) == {"adapter.safetensors", "README.md", "samples.png"}
    for name, text in texts.items():
        for path in private:
            assert path not in text, f"{name} names the local path {path}"
    meta = json.loads(texts["adapter.safetensors"])
    recipe = json.loads(meta["training_config"])
    assert meta["variant"] == "text_aware" and meta["format"] == "ip-adapter-plus" and meta["base_model"] == "local folder"
    assert recipe["learning_rate"] == config["learning_rate"] and recipe["batch_size"] == config["batch_size"]
    assert "output_dir" not in recipe and "data_dir" not in recipe and recipe["ip_adapter"] == "local file"
    with safe_open(str(trained / "adapter.safetensors"), framework="pt") as a, \
            safe_open(str(folder / "adapter.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_hub_names_stay_and_local_ones_become_neutral():
    assert public_name("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert public_name("h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors").startswith("h94/")
    assert public_name("/content/drive/MyDrive/my base") == "local folder"
    assert public_name("~/models/ip.safetensors") == "local file"
    settings = public_settings({"output_dir": "/x/runs", "data_dir": "./data", "dataset": "/home/me/drawings",
                                "seed": 0, "notes": {"where": "/home/me/notes.txt"}})
    assert settings == {"dataset": "local folder", "seed": 0, "notes": {"where": "local path"}}
    # a source given as a list (several folders) is cleaned item by item, never written as its str()
    assert public_settings({"dataset": ["/home/me/a", "me/hub-data"]}) == {"dataset": ["local path", "me/hub-data"]}
