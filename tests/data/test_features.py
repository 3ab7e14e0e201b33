"""helpers.data.features: the cache equals diffusers' own encoders, is reused while nothing changes, rebuilt when anything does."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _launch import as_process, one_test_part, torchrun

import helpers.data.features as features_module
import helpers.data.prepare as prepare_module
from helpers.data.features import (
    cache_features,
    cache_image_variant,
    feature_fingerprint,
    load_feature_cache,
    prepare_for_training,
    variant_cache_path,
)
from helpers.model.pipeline import load_pipeline
from helpers.support.lock import clean_temporaries


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
    monkeypatch.setattr(prepare_module, "decode_image_and_alpha", lambda *a, **k: pytest.fail("data re-prepared although nothing changed"))
    again, again_path = prepare_for_training(tiny_profile, folder, progress=False)
    assert again_path == path and list(again.train["id"]) == list(prep.train["id"])


def test_an_image_variant_is_the_changed_pictures_features_reused_until_its_inputs_change(
        tiny_profile, tiny_data, tiny_pipe, tmp_path, monkeypatch):
    """cache_image_variant (the mirror's and the masked references' features): transform(i, picture) gets each
    row's center-squared picture in the cache's order; the features are diffusers' encode_image of what it
    returns; an unchanged file is reused without a model, and a change of its extra metadata rebuilds it."""
    from PIL import ImageOps
    from safetensors.torch import load_file

    prep, path, _ = tiny_data
    cache = tmp_path / path.name
    shutil.copy2(path, cache)
    given = []

    def grey_corner(i, picture):  # a different change per row, so that a wrong row order shows
        given.append((i, picture.size, picture.mode))
        out = picture.copy()
        out.paste((128, 128, 128), (0, 0, 8 + i % 8, 8))
        return ImageOps.flip(out)

    kw = dict(version="1", base_model=tiny_profile.base_model, ip_adapter=tiny_profile.ip_adapter,
              resolution=tiny_profile.resolution, batch_size=7, progress=False)
    out = cache_image_variant(prep.train, cache, "cornered", grey_corner, extra_meta={"corner": "grey"}, **kw)
    r = tiny_profile.resolution
    assert out == variant_cache_path(cache, "cornered") == tmp_path / "train_features_cornered.safetensors"
    assert given == [(i, (r, r), "RGB") for i in range(len(prep.train))]
    embeds = load_file(str(out))["cornered_image_embeds"]
    for i in (0, 5):
        given.clear()
        picture = grey_corner(i, prep.train[i]["image"].convert("RGB"))
        with torch.no_grad():
            expected, _ = tiny_pipe.encode_image(picture, "cpu", 1, output_hidden_states=True)
        torch.testing.assert_close(embeds[i].float(), expected[0], atol=2e-2, rtol=1e-2)
    loads, real_load = [], load_pipeline
    monkeypatch.setattr(features_module, "load_pipeline", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    stamp = out.stat().st_mtime_ns
    cache_image_variant(prep.train, cache, "cornered", grey_corner, extra_meta={"corner": "grey"}, **kw)
    assert loads == [] and out.stat().st_mtime_ns == stamp  # reused: no model loaded
    cache_image_variant(prep.train, cache, "cornered", grey_corner, extra_meta={"corner": "black"}, **kw)
    assert loads == [1] and out.stat().st_mtime_ns != stamp  # what the pictures depend on changed: rebuilt
    with pytest.raises(ValueError, match="rows are not this split's"):
        cache_image_variant(prep.test, cache, "cornered", grey_corner, **kw)


# Faults while the cache is built: a full disk, out of GPU memory, a second writer (issue 25)


@pytest.fixture
def old_cache(tiny_profile, tiny_data, tmp_path):
    """A complete cache (a copy of the session's) in tmp_path, and the arguments that rebuild it for 6 rows."""
    prep, path, _ = tiny_data
    copy = tmp_path / path.name
    shutil.copy2(path, copy)
    kw = dict(base_model=tiny_profile.base_model, ip_adapter=tiny_profile.ip_adapter, resolution=tiny_profile.resolution,
              filename=path.name, progress=False)
    return copy, copy.read_bytes(), prep.train.select(range(6)), kw


def _nothing_left(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))  # no temporary, no lock


def test_a_full_disk_while_writing_the_cache_names_the_file_and_keeps_the_old_one(old_cache, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from helpers.support.disk import DiskFull

    copy, before, rows, kw = old_cache

    def disk_fills(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills)
    with pytest.raises(DiskFull) as err:
        cache_features(rows, tmp_path, **kw)
    assert str(copy) in str(err.value) and "disk is full" in str(err.value)
    assert copy.read_bytes() == before and _nothing_left(tmp_path) == []


def test_too_little_space_for_the_cache_stops_after_the_first_batch(old_cache, tmp_path, monkeypatch):
    import collections

    from helpers.support import disk
    from helpers.support.disk import DiskFull

    copy, before, rows, kw = old_cache
    real, batches = features_module.encode_batch, []
    monkeypatch.setattr(features_module, "encode_batch", lambda *a, **k: batches.append(1) or real(*a, **k))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskFull) as err:
        cache_features(rows, tmp_path, batch_size=2, **kw)
    assert str(copy) in str(err.value) and "MB needed" in str(err.value)
    assert batches == [1]  # one batch told the size: the other two were never encoded
    assert copy.read_bytes() == before and _nothing_left(tmp_path) == []


def test_out_of_gpu_memory_names_the_batch_size_and_a_smaller_one_gives_the_same_cache(old_cache, tiny_data, tmp_path,
                                                                                        monkeypatch):
    copy, before, rows, kw = old_cache

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(features_module, "encode_batch", oom)
        with pytest.raises(features_module.FeatureCacheError) as err:
            cache_features(rows, tmp_path, batch_size=4, **kw)
    message = str(err.value)
    assert "out of GPU memory" in message and "batch size 4" in message and "feature_batch_size" in message
    assert str(copy) in message and "run the same" in message
    assert copy.read_bytes() == before and _nothing_left(tmp_path) == []
    cache_features(rows, tmp_path, batch_size=2, **kw)  # the rerun, with a smaller batch
    whole = load_feature_cache(tiny_data[1])[0]  # built at the profile's batch size over all rows
    for k, v in load_feature_cache(copy)[0].items():
        torch.testing.assert_close(v, whole[k][:6] if v.shape[0] == 6 else whole[k], rtol=2e-3, atol=2e-3, msg=k)


def test_a_second_writer_of_the_cache_stops_at_once(old_cache, tmp_path, monkeypatch):
    import subprocess
    import sys
    import textwrap
    import time

    from helpers.support.lock import FolderInUse

    copy, before, rows, kw = old_cache
    code = textwrap.dedent(f"""
        import time
        from helpers.support.lock import FolderLock
        with FolderLock({str(tmp_path)!r}, "preparing data"):
            print("held", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "WORLD_SIZE": "1"})
    try:
        assert p.stdout.readline().strip() == "held"
        monkeypatch.setattr(features_module, "load_pipeline", lambda *a, **k: pytest.fail("a second writer loaded models"))
        start = time.monotonic()
        with pytest.raises(FolderInUse, match=f"pid {p.pid}"):
            cache_features(rows, tmp_path, **kw)
        assert time.monotonic() - start < 5 and copy.read_bytes() == before
    finally:
        p.kill()
        p.wait()


def test_the_cache_stays_valid_across_a_swap_of_the_same_data_and_not_of_other_data(tiny_profile, tmp_path,
                                                                                     monkeypatch):
    from _own_data import own_images

    from helpers.data.prepare import prepare_dataset

    own_images(tmp_path / "pics", n_drawings=2)
    kw = dict(base_model=tiny_profile.base_model, ip_adapter=tiny_profile.ip_adapter, progress=False)
    data = tmp_path / "data"
    prep = prepare_dataset(tmp_path / "pics", data, resolution=32, test_fraction=0, progress=False)
    path = cache_features(prep.train, data, resolution=32, **kw)
    stamp = path.stat().st_mtime_ns
    same = prepare_dataset(tmp_path / "pics", data, resolution=32, test_fraction=0, overwrite=True, progress=False)
    assert same.info["splits"] != prep.info["splits"]  # prepared anew and swapped in
    with monkeypatch.context() as m:
        m.setattr(features_module, "load_pipeline", lambda *a, **k: pytest.fail("the cache of unchanged rows was rebuilt"))
        assert cache_features(same.train, data, resolution=32, **kw) == path and path.stat().st_mtime_ns == stamp
    other = prepare_dataset(tmp_path / "pics", data, resolution=64, test_fraction=0, progress=False)
    cache_features(other.train, data, resolution=32, **kw)  # other pixels, the same cache resolution
    assert path.stat().st_mtime_ns != stamp


# Several processes (issue 28): the cache's jobs shared out, merged by the main process into the same tensors


def _same_cache(a, b):
    ta, ma = load_feature_cache(a)
    tb, mb = load_feature_cache(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "other tensors"
    assert ma == mb  # fingerprint, ids, scaling factor, device


@one_test_part
def test_a_cache_built_by_two_processes_equals_the_one_built_by_one(tiny_data, tmp_path):
    """prepare_for_training in both processes of a torchrun launch (as training calls it): 3 batches and the null
    features dealt out, each process's written to its shares, merged by the main process; no share left."""
    prep, path, folder = tiny_data
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / path.name).unlink()
    out = torchrun(Path(__file__).with_name("_cache_launch.py"), data).stdout
    # 36 rows at the profile's 16 per batch: process 0 encodes rows 0-15 and 32-35, process 1 rows 16-31 (and null)
    assert sorted(re.findall(r"process (\d) encoded (\d+) rows", out)) == [("0", "20"), ("1", "16")]
    _same_cache(data / path.name, path)  # the session's cache, built by one process at the same batch size
    assert _nothing_left(data) == []  # no share, no temporary, no lock


def test_a_build_uses_the_shares_a_killed_launch_left(tiny_data, old_cache, tmp_path, monkeypatch):
    """Process 1 of a 2-process launch writes its shares and the launch dies before the merge; a one-process
    build then encodes only the jobs it lacks and ends with the cache one process builds."""
    copy, before, rows, kw = old_cache
    copy.unlink()
    one = tmp_path / "one"
    cache_features(rows, one, batch_size=2, **kw)  # 3 batches + the null features, by one process
    encoded = []
    real = features_module.encode_batch
    monkeypatch.setattr(features_module, "encode_batch", lambda p, im, t, r: encoded.append(len(t)) or real(p, im, t, r))
    with monkeypatch.context() as m:  # process 1 of 2: jobs 2 and 4 of [rows 0-1, 2-3, 4-5, null], and no merge
        as_process(m, 1, 2)
        cache_features(rows, tmp_path, batch_size=2, **kw)
    shares = sorted(p.name for p in tmp_path.glob(".*.share-*"))
    assert encoded == [2] and not copy.exists()
    assert shares == [f".{copy.name}.share-null", f".{copy.name}.share-rows-2-4"]
    assert clean_temporaries(tmp_path) == [] and len(list(tmp_path.glob(".*.share-*"))) == 2  # the lock keeps them
    cache_features(rows, tmp_path, batch_size=2, **kw)  # the next run, alone
    assert encoded == [2, 2, 2]  # rows 0-1 and 4-5: the shares' jobs are not done again
    _same_cache(copy, one / copy.name)
    assert _nothing_left(tmp_path) == []
