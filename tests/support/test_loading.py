"""helpers.support.loading: a wrong or unreachable id fails with a message that names it and says what to do.

The suite runs offline (HF_HUB_OFFLINE=1, conftest), so a made-up Hub id is exactly what a user sees for a
typo on a machine without the files, or on Colab with the Hub unreachable.
"""
import re

import pytest
import torch

from helpers.support.loading import LoadError, explain, fp16_first, loading

MADE_UP = "no-such-owner/no-such-model"
OFFLINE = r"offline \(HF_HUB_OFFLINE is set\).*not in the local Hugging Face cache.*Check the spelling"


def test_every_loader_names_the_made_up_id_and_says_what_to_do(tiny_profile):
    from helpers.data.captions import blip_captions, token_counts
    from helpers.evaluate.metrics import CLIPScorer, DINOScorer
    from helpers.model.pipeline import load_pipeline, load_unet, load_vae

    base, ip = tiny_profile.base_model, tiny_profile.ip_adapter
    cases = {
        "base model": lambda: load_pipeline(MADE_UP, ip, device="cpu"),
        "base model's UNet": lambda: load_unet(MADE_UP, ip, image_encoder_dim=32, device="cpu"),
        "IP-Adapter file": lambda: load_pipeline(base, f"{MADE_UP}/models/ip-adapter-plus_sd15.safetensors"),
        "image encoder": lambda: load_pipeline(base, ip, image_encoder=f"{MADE_UP}/models/image_encoder"),
        "VAE": lambda: load_vae(MADE_UP),
        "evaluation CLIP": lambda: CLIPScorer(MADE_UP, device="cpu"),
        "DINO model": lambda: DINOScorer(MADE_UP, device="cpu"),
        "captioning model (BLIP)": lambda: blip_captions([], MADE_UP, device="cpu"),
        "base model's tokenizer": lambda: token_counts(["a cat"], MADE_UP),
    }
    for what, load in cases.items():
        with pytest.raises(LoadError, match=f"cannot load the {re.escape(what)}.*'{MADE_UP}.*': this machine is {OFFLINE}") as info:
            load()
        assert info.value.__cause__ is not None  # the library's own error stays attached


def test_dataset_by_made_up_id(tmp_path):
    from helpers.data.prepare import prepare_dataset
    from helpers.data.sources import DataSourceError

    with pytest.raises(DataSourceError, match=f"cannot load the dataset.*'{MADE_UP}'.*{OFFLINE}"):
        prepare_dataset(MADE_UP, tmp_path / "data", resolution=64)


def test_local_paths_that_are_missing_or_wrong(tmp_path, tiny_profile):
    from helpers.model.pipeline import load_pipeline

    with pytest.raises(LoadError, match=f"'{tmp_path / 'nothing'}': there is no such local file or folder: check the path"):
        load_pipeline(tmp_path / "nothing", tiny_profile.ip_adapter, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="exists but does not hold a loadable base model .*check that it is the right folder"):
        load_pipeline(tmp_path / "empty", tiny_profile.ip_adapter, device="cpu")


def _hub_error(cls_name: str):
    """One of huggingface_hub's errors, built without a network response."""
    from huggingface_hub import errors

    cls = getattr(errors, cls_name)
    err = cls.__new__(cls)
    Exception.__init__(err, f"{cls_name}: 404 Client Error")
    return err


@pytest.mark.parametrize("kind, advice", [
    ("RepositoryNotFoundError", r"no Hub repo 'owner/model' is visible to you: check the spelling.*private or gated.*hf auth login"),
    ("GatedRepoError", r"owner/model is gated: accept its terms on https://huggingface.co/owner/model and log in"),
    ("RemoteEntryNotFoundError", r"the repo owner/model exists but lacks the file this needs: check the subfolder"),
    ("RevisionNotFoundError", r"no such revision"),
])
def test_advice_follows_the_kind_of_failure(kind, advice):
    wrapped = OSError("owner/model is not a local folder and is not a valid model identifier")
    wrapped.__cause__ = _hub_error(kind)
    assert re.search(advice, explain("image encoder", "owner/model/models/image_encoder", wrapped))


def test_only_load_failures_are_rewritten():
    with pytest.raises(ImportError, match="torchvision"):  # a missing package is not a matter of the id
        with loading("DINO model", "facebook/dino-vits16"):
            raise ImportError("ViTImageProcessor requires torchvision")
    with pytest.raises(LoadError) as info:
        with loading("VAE", "owner/vae"):
            raise OSError("owner/vae does not appear to have a file named config.json")
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)  # callers' except OSError holds


def test_fp16_first_falls_back_to_the_default_files():
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        if kwargs.get("variant") == "fp16":
            raise OSError("no file named diffusion_pytorch_model.fp16.safetensors")
        return "model"

    assert fp16_first(load, torch.float16) == ("model", "default") and calls == [{"variant": "fp16"}, {}]
    calls.clear()
    assert fp16_first(load, torch.float32) == ("model", "default") and calls == [{}]  # fp32: never the fp16 files
    assert fp16_first(lambda **kw: kw, torch.float16) == ({"variant": "fp16"}, "fp16")
