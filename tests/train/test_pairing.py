"""helpers.train.pairing: neighbours stay in the training split and outside their own group, mirror features are the
flipped images', self pairing is today's training bit for bit, and every pairing resumes exactly."""
import json

import pytest
import torch
from PIL import ImageOps
from safetensors.torch import load_file

import helpers.train.step as step_module
from helpers.data.features import (
    cache_mirror_features,
    load_feature_cache,
    mirror_cache_path,
)
from helpers.data.images import center_square
from helpers.share.card import _training_table
from helpers.share.run_info import eval_model_name, read_run
from helpers.train.__main__ import main as train_main
from helpers.train.config import TrainConfig
from helpers.train.loop import train
from helpers.train.loss import diffusion_loss, drop_masks, epoch_order
from helpers.train.loss_log import read_loss_log
from helpers.train.pairing import (
    DEFAULT_SELF_PROB,
    PAIRS_FILE,
    PairingError,
    cls_features,
    load_pairs,
    make_pairs,
    nearest_outside_group,
    pair_table,
    run_name,
)


@pytest.fixture(scope="module")
def cache(tiny_data):
    prep, path, folder = tiny_data
    features, meta = load_feature_cache(path)
    return prep, features, meta


def neighbour_pairs(cache, **kw):
    prep, features, meta = cache
    return make_pairs("neighbour", features, meta, list(prep.train["id"]), list(prep.train["group"]), **kw)


def config(tiny_data, out, **kw):
    kw = {"variant": "text_aware", "profile": "tiny", "max_steps": 5, "checkpoint_every": 2, **kw}
    return TrainConfig(output_dir=str(out), data_dir=str(tiny_data[2]), **kw)


def same_weights(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------------


def test_neighbours_come_from_the_training_split_and_never_from_their_own_group(cache):
    prep, features, _ = cache
    pairs = neighbour_pairs(cache)
    train_ids, test_ids = set(prep.train["id"]), set(prep.test["id"])
    refs = [row["reference"] for row in pair_table(pairs, prep.train)]
    assert len(test_ids) > 0 and set(refs) <= train_ids and not set(refs) & test_ids  # no pair crosses the split
    groups = list(prep.train["group"])
    assert all(groups[i] != groups[j] for i, j in enumerate(pairs.reference))  # never the own group (or itself)
    # brute force, one row at a time: the highest centred-CLS cosine among rows of other groups
    cls = features["image_embeds"][:, 0].double()
    cls = cls - cls.mean(0)
    for i in range(len(groups)):
        cos = {j: float(cls[i] @ cls[j] / (cls[i].norm() * cls[j].norm())) for j in range(len(groups)) if groups[j] != groups[i]}
        best = max(cos, key=cos.get)
        assert cos[pairs.reference[i]] == pytest.approx(cos[best], abs=1e-5)
        assert pairs.similarity[i] == pytest.approx(cos[best], abs=1e-4)
    assert pairs.self_prob == DEFAULT_SELF_PROB == 0.25


def test_nearest_outside_group_on_known_points():
    unit = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.6, 0.8], [0.1, 0.99]]), dim=-1)
    groups = [0, 0, 1, 2, 1]  # 0 and 1 share a group, so do 2 and 4: each one's nearest is the other, excluded
    index, cosine = nearest_outside_group(unit, groups)
    assert index.tolist() == [3, 3, 3, 4, 3]
    assert torch.equal(nearest_outside_group(unit, groups, chunk=2)[0], index)  # chunking changes nothing
    torch.testing.assert_close(cosine, (unit * unit[index]).sum(-1))
    with pytest.raises(PairingError, match="all 3 training drawings are in one near-duplicate group"):
        nearest_outside_group(unit[:3], [4, 4, 4])


def test_cls_features_are_centred_unit_vectors(cache):
    unit = cls_features(cache[1]["image_embeds"])
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(unit)))
    assert unit.shape == (len(cache[0].train), cache[1]["image_embeds"].shape[-1])


def test_bad_settings_are_refused_with_a_reason(cache):
    prep, features, meta = cache
    with pytest.raises(PairingError, match=r"must lie in \[0, 1\], got 1.5"):
        neighbour_pairs(cache, self_prob=1.5)
    with pytest.raises(PairingError, match="rows are not the training split's"):
        make_pairs("neighbour", features, meta, list(prep.train["id"])[::-1], list(prep.train["group"]))
    with pytest.raises(PairingError, match="mirror pairing needs the mirror features"):
        make_pairs("mirror", features, meta, list(prep.train["id"]), list(prep.train["group"]))


def test_the_self_mix_has_its_rate_and_depends_only_on_seed_step_and_process(cache):
    prep, features, _ = cache
    pairs = neighbour_pairs(cache)
    masks = torch.stack([pairs.self_mask(4, seed=0, step=s) for s in range(4000)])
    assert abs(masks.float().mean() - 0.25) < 0.015
    assert torch.equal(pairs.self_mask(4, seed=0, step=7), masks[7])  # the same draw again, as after a resume
    assert not torch.equal(masks[:50], torch.stack([pairs.self_mask(4, seed=0, step=s, process=1) for s in range(50)]))
    rows = torch.arange(6)
    neighbours = features["image_embeds"][torch.as_tensor(pairs.reference)[rows]]
    pairs.self_prob = 0.0
    assert torch.equal(pairs.references(features, rows, seed=0, step=3), neighbours)
    pairs.self_prob = 1.0
    assert torch.equal(pairs.references(features, rows, seed=0, step=3), features["image_embeds"][rows])


# --------------------------------------------------------------------------------------------------
# Mirror features
# --------------------------------------------------------------------------------------------------


def test_mirror_features_are_the_flipped_images_features(tiny_profile, tiny_data, vanilla):
    prep, path, _ = tiny_data
    kw = dict(base_model=tiny_profile.base_model, ip_adapter=tiny_profile.ip_adapter, resolution=tiny_profile.resolution,
              progress=False)
    mirror = cache_mirror_features(prep.train, path, **kw)
    assert mirror == mirror_cache_path(path) and mirror.name == "train_features_mirror.safetensors"
    embeds = load_file(str(mirror))["mirror_image_embeds"]
    assert embeds.shape == load_feature_cache(path)[0]["image_embeds"].shape and embeds.dtype == torch.float16
    for i in (0, 5):  # diffusers' own encode_image on the flipped picture
        flipped = ImageOps.mirror(center_square(prep.train[i]["image"], tiny_profile.resolution))
        with torch.no_grad():
            expected, _ = vanilla.encode_image(flipped, "cpu", 1, output_hidden_states=True)
        torch.testing.assert_close(embeds[i].float(), expected[0], atol=2e-2, rtol=1e-2)
    stamp = mirror.stat().st_mtime_ns
    assert cache_mirror_features(prep.train, path, **kw) == mirror and mirror.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ValueError, match="rows are not this split's"):
        cache_mirror_features(prep.test, path, **kw)


# --------------------------------------------------------------------------------------------------
# Training with pairs
# --------------------------------------------------------------------------------------------------


def seed_project_step_batch(run, step):
    """helpers.train.step_batch and loss.make_batch as they were before pairing existed (commit 1241bda)."""
    acc, feats, b = run.accelerator, run.feats, run.batch_size
    global_batch = b * acc.num_processes
    epoch, pos = divmod(step, run.steps_per_epoch)
    rows = epoch_order(len(feats["image_embeds"]), epoch, run.config.seed, global_batch)[pos * global_batch:(pos + 1) * global_batch]
    rows = rows[acc.process_index * b:(acc.process_index + 1) * b]
    g = torch.Generator().manual_seed(run.config.seed * 1_000_003 + step * 1_009 + acc.process_index)
    drop_text, drop_image = drop_masks(len(rows), g)
    batch = {
        "latent_mean": feats["latent_mean"][rows],
        "latent_std": feats["latent_std"][rows],
        "text_embeds": torch.where(drop_text[:, None, None], feats["null_text_embeds"], feats["text_embeds"][rows]),
        "image_embeds": torch.where(drop_image[:, None, None], feats["null_image_embeds"], feats["image_embeds"][rows]),
    }
    return {k: v.to(acc.device) for k, v in batch.items()}, g


@pytest.fixture(scope="module")
def self_run(tiny_data, tmp_path_factory):
    return train(config(tiny_data, tmp_path_factory.mktemp("self") / "text_aware"), progress=False)


def test_self_pairing_is_todays_training_bit_for_bit(tiny_data, self_run, tmp_path, monkeypatch):
    monkeypatch.setattr(step_module, "step_batch", seed_project_step_batch)
    before = train(config(tiny_data, tmp_path / "before"), progress=False)
    assert self_run.losses == before.losses and same_weights(self_run.adapter, before.adapter)
    assert not (self_run.adapter.parent / PAIRS_FILE).exists()
    assert json.loads((self_run.adapter.parent / "config.json").read_text())["pairing"] == "self"


@pytest.mark.parametrize("pairing", ["mirror", "neighbour"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(pairing, tiny_data, self_run, tmp_path, monkeypatch,
                                                                 capsys):
    whole = train(config(tiny_data, tmp_path / "a" / run_name("text_aware", pairing), pairing=pairing), progress=False)
    assert not same_weights(whole.adapter, self_run.adapter)  # the pairing changed what training saw
    real_loss, calls = diffusion_loss, []

    def crash_at_step_4(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the session dies after the checkpoint at step 2 ... and step 3
        return real_loss(*args, **kw)

    out = tmp_path / "b" / run_name("text_aware", pairing)
    monkeypatch.setattr(step_module, "diffusion_loss", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_data, out, pairing=pairing), progress=False)
    monkeypatch.setattr(step_module, "diffusion_loss", real_loss)
    resumed = train(config(tiny_data, out, pairing=pairing), progress=False)
    assert "Resuming from" in capsys.readouterr().out and resumed.resumed_from == 2
    assert same_weights(whole.adapter, resumed.adapter)
    assert load_pairs(out) == load_pairs(whole.adapter.parent)
    assert [r["loss"] for r in read_loss_log(out)] == [r["loss"] for r in read_loss_log(whole.adapter.parent)]


def test_neighbour_with_self_prob_one_is_self_pairing(tiny_data, self_run, tmp_path):
    """The mix draws from a stream of its own: with every sample kept self, nothing else in the step moves."""
    run = train(config(tiny_data, tmp_path / "n", pairing="neighbour", pairing_self_prob=1.0), progress=False)
    assert run.losses == self_run.losses and same_weights(run.adapter, self_run.adapter)


def test_a_run_folder_keeps_its_pairing(tiny_data, tmp_path, capsys):
    out = tmp_path / "runs" / "text_aware_neighbour"
    data = ["--profile", "tiny", "--data-dir", str(tiny_data[2]), "--max-steps", "2", "--checkpoint-every", "2"]
    train_main([*data, "--output-dir", str(out), "--pairing", "neighbour", "--pairing-self-prob", "0.5"])
    saved = json.loads((out / PAIRS_FILE).read_text())
    assert saved["pairing"] == "neighbour" and saved["self_prob"] == 0.5 and len(saved["reference_ids"]) == len(saved["ids"])
    settings = json.loads((out / "config.json").read_text())
    assert settings["pairing"] == "neighbour" and settings["pairing_self_prob"] == 0.5
    with pytest.raises(SystemExit, match=r"checkpoints of a run with neighbour pairing.*another output folder"):
        train_main([*data, "--output-dir", str(out)])  # self pairing must not resume a neighbour run
    with pytest.raises(SystemExit, match=r"self probability 0.5, not 0.25"):
        train_main([*data, "--output-dir", str(out), "--pairing", "neighbour"])
    train_main([*data, "--output-dir", str(tmp_path / "runs" / "text_aware")])
    with pytest.raises(SystemExit, match=r"checkpoints of a self-paired run.*text_aware_mirror"):
        train_main([*data, "--output-dir", str(tmp_path / "runs" / "text_aware"), "--pairing", "mirror"])
    run = read_run(out)
    assert eval_model_name(run) == "finetuned-text-aware-neighbour"
    assert eval_model_name(read_run(tmp_path / "runs" / "text_aware")) == "finetuned-text-aware"
    assert "| reference | neighbour pairing: the nearest other training drawing" in _training_table(run)
