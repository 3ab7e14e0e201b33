"""helpers.data.features: the cache equals diffusers' own encoders, is reused while nothing changes, rebuilt when anything does."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import helpers.data.features as features_module
import helpers.data.prepare as prepare_module
from helpers.data.features import (
    cache_features,
    feature_fingerprint,
    load_feature_cache,
    prepare_for_training,
)
from helpers.model.pipeline import load_pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tiny_profile):
    from helpers.model.pipeline import load_pipeline

    return load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, device="cpu")


def test_feature_cache_equals_diffusers_encoders(tiny_data, tiny_pipe):
    prep, path, _ = tiny_data
    tensors, meta = load_feature_cache(path)
    pipe, n, r = tiny_pipe, len(prep.train), prep.info["resolution"]
    images, texts = list(prep.train["image"]), list(prep.train["text"])
    assert json.loads(meta["ids"]) == list(prep.train["id"]) and meta["resolution"] == str(r)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    with torch.no_grad():
        cond, uncond = pipe.encode_image(images, "cpu", 1, output_hidden_states=True)
        text, _ = pipe.encode_prompt(texts, "cpu", 1, False)
        empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
        pixels = torch.tensor(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = pipe.vae.encode(pixels).latent_dist
    reference = {"latent_mean": dist.mean, "latent_std": dist.std, "image_embeds": cond, "text_embeds": text,
                 "null_image_embeds": uncond[:1], "null_text_embeds": empty}
    assert set(tensors) == set(reference)
    assert tensors["latent_mean"].shape == (n, 4, r // 8, r // 8) and tensors["text_embeds"].shape[:2] == (n, 77)
    for k, ref in reference.items():
        assert tensors[k].shape == ref.shape, k
        torch.testing.assert_close(tensors[k].float(), ref.float(), rtol=2e-3, atol=2e-3, msg=k)
    assert not torch.equal(tensors["image_embeds"][0], tensors["null_image_embeds"][0])


def test_feature_cache_is_reused_and_rebuilt_when_data_changes(tiny_profile, tiny_data, tmp_path, monkeypatch):
    prep, path, _ = tiny_data
    copy = tmp_path / path.name
    shutil.copy2(path, copy)
    stamp = copy.stat().st_mtime_ns
    kw = dict(base_model=tiny_profile.base_model, ip_adapter=tiny_profile.ip_adapter, resolution=tiny_profile.resolution,
              filename=path.name, progress=False)
    loads = []
    real_load = load_pipeline
    monkeypatch.setattr(features_module, "load_pipeline", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    assert cache_features(prep.train, tmp_path, **kw) == copy
    assert loads == [] and copy.stat().st_mtime_ns == stamp  # same data and models: no model loaded, file untouched
    n = 6  # a smaller split keeps the rebuild quick; its first caption changes
    changed = prep.train.select(range(n)).map(
        lambda row, i: {"text": row["text"] + " in the rain" if i == 0 else row["text"]}, with_indices=True)
    cache_features(changed, tmp_path, **kw)
    assert loads == [1] and copy.stat().st_mtime_ns != stamp
    old, new = load_feature_cache(path)[0], load_feature_cache(copy)[0]
    assert new["text_embeds"].shape[0] == n
    assert not torch.equal(old["text_embeds"][0], new["text_embeds"][0])
    torch.testing.assert_close(old["text_embeds"][1:n], new["text_embeds"][1:])
    torch.testing.assert_close(old["image_embeds"][:n], new["image_embeds"])
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary file left


def test_model_changes_change_the_fingerprint(tiny_profile, tiny_data, tmp_path):
    prep = tiny_data[0]
    kw = dict(base_model=tiny_profile.base_model, resolution=tiny_profile.resolution)
    adapter = tmp_path / "ip_adapter" / os.path.basename(tiny_profile.ip_adapter)
    shutil.copytree(os.path.dirname(tiny_profile.ip_adapter), adapter.parent)
    a = feature_fingerprint(prep.train, ip_adapter=tiny_profile.ip_adapter, **kw)["fingerprint"]
    assert feature_fingerprint(prep.train, ip_adapter=tiny_profile.ip_adapter, **kw)["fingerprint"] == a
    b = feature_fingerprint(prep.train, ip_adapter=str(adapter), **kw)["fingerprint"]
    os.utime(adapter, ns=(adapter.stat().st_atime_ns, adapter.stat().st_mtime_ns + 10**9))
    c = feature_fingerprint(prep.train, ip_adapter=str(adapter), **kw)["fingerprint"]
    assert len({a, b, c}) == 3


def test_prepare_for_training_is_idempotent(tiny_profile, tiny_data, monkeypatch):
    prep, path, folder = tiny_data
    assert path.parent == folder and (folder / prep.info["splits"] / "train").is_dir()
    assert {"dataset"} == set(prep.train["caption_source"])  # the tiny dataset has captions
    monkeypatch.setattr(features_module, "load_pipeline", lambda *a, **k: pytest.fail("cache rebuilt although nothing changed"))
    monkeypatch.setattr(prepare_module, "decode_image", lambda *a, **k: pytest.fail("data re-prepared although nothing changed"))
    again, again_path = prepare_for_training(tiny_profile, folder, progress=False)
    assert again_path == path and list(again.train["id"]) == list(prep.train["id"])
