"""helpers.support.locations: the one reading of a name as a local path or a Hub repo (and a path in it)."""
import pytest

from helpers.support.locations import (
    image_encoder_next_to,
    is_hub_id,
    looks_local,
    split_hub_file,
    split_hub_name,
)


def test_names_that_can_only_be_local():
    for name in ("/abs/path", "./runs", "../x", "~/drawings", "C:\\data", "https://x/y", "adapter.safetensors"):
        assert looks_local(name) and split_hub_name(name) is None, name
    for name in ("h94/IP-Adapter", "openai/clip-vit-large-patch14", "me/a/sub/w.safetensors", "gpt2"):
        assert not looks_local(name), name


def test_hub_names_split_into_repo_and_path():
    assert split_hub_name("me/a") == ("me/a", "")
    assert split_hub_name("h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors") == (
        "h94/IP-Adapter", "models/ip-adapter-plus_sd15.safetensors")
    assert split_hub_name("gpt2") is None  # no owner/repo part
    assert split_hub_name("me/a b") is None  # not a valid repo id (huggingface_hub's own rule)
    assert split_hub_file("h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors") == (
        "h94/IP-Adapter", "models", "ip-adapter-plus_sd15.safetensors")
    assert split_hub_file("me/a/w.bin") == ("me/a", "", "w.bin")
    for name in ("me/a", "./x/w.bin", "gpt2"):
        with pytest.raises(ValueError, match="neither an existing local file nor 'hub_owner/repo/subfolder/file'"):
            split_hub_file(name)


def test_a_hub_id_is_exactly_owner_name_and_not_a_local_path(tmp_path, monkeypatch):
    assert is_hub_id("Norod78/RickAndMorty-HorizontalMirror-blip-captions")
    assert not is_hub_id("h94/IP-Adapter/models") and not is_hub_id("/abs/x") and not is_hub_id("gpt2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "a").mkdir(parents=True)
    assert not is_hub_id("me/a")  # an existing local folder wins, as in from_pretrained


def test_the_image_encoder_lies_beside_the_ip_adapter_file(tmp_path):
    assert image_encoder_next_to("h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors") == (
        "h94/IP-Adapter", "models/image_encoder")
    assert image_encoder_next_to("me/a/w.safetensors") == ("me/a", "image_encoder")
    local = tmp_path / "ip" / "w.safetensors"
    local.parent.mkdir()
    local.write_bytes(b"")
    assert image_encoder_next_to(local) == (str(tmp_path / "ip" / "image_encoder"), "")
    with pytest.raises(ValueError, match="neither an existing local file"):
        image_encoder_next_to("me/a")  # a repo, not a file in one
