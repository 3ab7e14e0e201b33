"""helpers.train.masking: MASK none is today's training bit for bit; each mask source reaches the loss as given; the
masked reference is the picture with its background filled, and composes with pairing; a changed mask never
resumes; masked runs have their folders and registry names."""
import io
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageOps
from safetensors.torch import load_file

import helpers.data.features as features_module
import helpers.train.run as run_module
import helpers.train.step as step_module
from helpers.data.features import prepare_for_training, variant_cache_path
from helpers.data.masks import load_masks, prepare_masks, to_latent
from helpers.data.prepare import prepare_dataset
from helpers.evaluate.protocol import GRID_MODELS
from helpers.sample.registry import FINETUNED, MODELS, masked_twins
from helpers.train.config import RESUME_SETTINGS, TrainConfig
from helpers.train.loop import train
from helpers.train.loss import diffusion_loss, epoch_order
from helpers.train.masking import FILL, MASKS, cost_line
from helpers.train.pairing import run_name
from helpers.train.run import TrainingError, prepare_run, release
from helpers.train.step import step_batch, training_step
from helpers.tiny.cartoons import cartoon_rows

RES = 64  # the tiny profile's resolution: the drawings reach the prepared data without a resize


def config(data_dir, out, **kw):
    kw = {"variant": "text_aware", "profile": "tiny", "max_steps": 3, "checkpoint_every": 2, **kw}
    return TrainConfig(output_dir=str(out), data_dir=str(data_dir), **kw)


def same_weights(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tiny_profile, tmp_path_factory):
    """The tiny profile's data with its feature cache and its masks (the tiny CLIPSeg's), in a folder of this module."""
    folder = tmp_path_factory.mktemp("masked_data")
    prep, cache = prepare_for_training(tiny_profile, folder, progress=False)
    return prep, cache, folder, prepare_masks(prep, tiny_profile, progress=False)


@pytest.fixture(scope="module")
def none_run(data, tmp_path_factory):
    return train(config(data[2], tmp_path_factory.mktemp("none") / "text_aware"), progress=False)


# --------------------------------------------------------------------------------------------------
# MASK none: the recipe as it was
# --------------------------------------------------------------------------------------------------


def test_mask_none_gives_the_adapter_of_the_recipe_without_the_mask_code(data, none_run, tmp_path, monkeypatch):
    """The run of MASK none against the same run with the mask code cut off where it enters: prepare_run's _masking
    (no masks, no cost line, no masked features) and the masked loss (a batch with a latent_mask, or a background
    weight, fails). Both runs step with helpers.train's own step_batch and diffusion_loss: their unmasked path is
    pinned on its own (test_pairing: the seed project's batches; below: the loss computed pixel by pixel)."""
    real_loss = step_module.diffusion_loss

    def unmasked_loss(unet, scheduler, batch, generator, scaling_factor, *, background_weight=None):
        assert "latent_mask" not in batch and background_weight is None, "MASK none reached the masked loss"
        return real_loss(unet, scheduler, batch, generator, scaling_factor)

    monkeypatch.setattr(step_module, "diffusion_loss", unmasked_loss)
    monkeypatch.setattr(run_module, "_masking", lambda *a, **k: None)  # no masks, no cost line, no masked features
    before = train(config(data[2], tmp_path / "text_aware"), progress=False)
    assert none_run.losses == before.losses and same_weights(none_run.adapter, before.adapter)
    settings = json.loads((none_run.adapter.parent / "config.json").read_text())
    assert settings["mask"] == "none" and settings["masks"] is None and settings["mask_background_weight"] is None


class EchoUNet(torch.nn.Module):
    """A stand-in UNet with the real one's call: predicts from every input, keeps its last prediction."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.tensor(0.5), requires_grad=False)  # sets the weight dtype

    def forward(self, noisy, t, encoder_hidden_states, added_cond_kwargs):
        image = added_cond_kwargs["image_embeds"][0]  # (B, 1, tokens, width)
        shift = encoder_hidden_states.mean((1, 2)) + image.mean((1, 2, 3)) + t / 1000  # (B,)
        self.pred = self.frozen * noisy + shift[:, None, None, None]
        return SimpleNamespace(sample=self.pred)


def test_without_a_mask_the_loss_is_the_mean_squared_error_of_the_noise(monkeypatch):
    """diffusion_loss without latent_mask (MASK none or reference) is the mean over every latent element of
    (prediction - noise)^2, summed here pixel by pixel; a mask of ones at any background weight gives the same."""
    scheduler, added = DDPMScheduler(), []
    real_add_noise = scheduler.add_noise
    monkeypatch.setattr(scheduler, "add_noise", lambda latents, noise, t: added.append(noise) or real_add_noise(
        latents, noise, t))
    g = torch.Generator().manual_seed(0)
    batch = {"latent_mean": torch.randn(2, 4, 3, 3, generator=g), "latent_std": torch.rand(2, 4, 3, 3, generator=g),
             "text_embeds": torch.randn(2, 5, 8, generator=g), "image_embeds": torch.randn(2, 3, 8, generator=g)}
    unet = EchoUNet()
    loss = diffusion_loss(unet, scheduler, batch, torch.Generator().manual_seed(1), 0.18215)
    pred, noise = unet.pred.detach(), added[0]
    squares = [(pred[b, c, y, x].item() - noise[b, c, y, x].item()) ** 2
               for b, c, y, x in itertools.product(*map(range, pred.shape))]
    assert loss.item() == pytest.approx(sum(squares) / len(squares), rel=1e-6)
    ones = diffusion_loss(unet, scheduler, {**batch, "latent_mask": torch.ones(2, 3, 3)},
                          torch.Generator().manual_seed(1), 0.18215, background_weight=0.1)
    assert ones.item() == pytest.approx(loss.item(), rel=1e-6) and torch.equal(added[1], noise)


# --------------------------------------------------------------------------------------------------
# What training receives
# --------------------------------------------------------------------------------------------------


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_each_mask_source_reaches_the_loss_as_given(tiny_profile, tmp_path, monkeypatch):
    """The cartoons' oracle masks given as alpha channels and as a masks folder, the segmenter for the rest:
    for each row, what the loss receives is the stored mask's latent, and for the user's masks the oracle's
    own (to_latent of the true mask, exactly)."""
    rows = cartoon_rows(RES)[:12]
    src, masks_dir = tmp_path / "drawings", tmp_path / "masks"
    src.mkdir()
    masks_dir.mkdir()
    lines = []
    for i, (im, text, truth) in enumerate(rows):
        if i % 3 == 0:
            im = im.convert("RGBA")
            im.putalpha(truth)  # a cut-out: the alpha channel is the character
        elif i % 3 == 1:
            (masks_dir / f"d{i}.png").write_bytes(png(truth))
        (src / f"d{i}.png").write_bytes(png(im))
        lines.append(json.dumps({"file_name": f"d{i}.png", "text": text}))
    (src / "metadata.jsonl").write_text("\n".join(lines))
    prep = prepare_dataset(src, tmp_path / "data", resolution=RES, test_fraction=0.25, masks=masks_dir, progress=False)
    truths = {f"d{i}.png": to_latent(np.asarray(truth)[None] > 0)[0] for i, (_, _, truth) in enumerate(rows)}
    run = prepare_run(config(tmp_path / "data", tmp_path / "run", mask="loss", batch_size=len(prep.train)),
                      progress=False)  # the masks are made here: this folder has none yet
    try:
        masks = load_masks(prep)
        ids = list(prep.train["id"])
        sources = {masks.source("train", i) for i in ids}
        assert sources == {"alpha", "masks folder", "segmenter"}
        received = []
        real_loss = step_module.diffusion_loss

        def spy(unet, scheduler, batch, *args, **kw):
            received.append((batch["latent_mask"].cpu().clone(), kw["background_weight"]))
            return real_loss(unet, scheduler, batch, *args, **kw)

        monkeypatch.setattr(step_module, "diffusion_loss", spy)
        training_step(run, 0)
        (got, b), = received
        order = epoch_order(len(ids), 0, run.config.seed, len(ids))
        assert sorted(order.tolist()) == list(range(len(ids)))  # one step of a whole-split batch: every row
        assert b == tiny_profile.mask_background_weight
        for k, row in enumerate(order.tolist()):
            rid = ids[row]
            assert torch.equal(got[k], torch.from_numpy(masks.latent("train", rid))), rid
            if masks.source("train", rid) != "segmenter":  # the user's own mask: the oracle, exactly
                assert np.array_equal(got[k].numpy(), truths[rid]), rid
    finally:
        release(run)


def test_a_masked_reference_is_the_picture_with_its_background_filled_and_composes_with_pairing(
        tiny_profile, data, tmp_path, monkeypatch):
    """MASK both with neighbour pairing: the encoder saw each training drawing with every background pixel set to
    the fill and every character pixel kept; a step conditions each target on its reference's masked features
    (the neighbour's, or its own when kept self) and weights its loss by the target's own mask."""
    prep, cache, folder, masks = data
    seen, real_encode = [], features_module.encode_images

    def note(pipe, images):
        seen.extend(np.asarray(im) for im in images)
        return real_encode(pipe, images)

    monkeypatch.setattr(features_module, "encode_images", note)
    run = prepare_run(config(folder, tmp_path / run_name("text_aware", "neighbour", "both"), mask="both",
                             pairing="neighbour", pairing_self_prob=0.5), progress=False)
    try:
        ids = list(prep.train["id"])
        assert len(seen) == len(ids)  # one pass over the training drawings, cached
        assert all(0 < c < 1 for c in masks.coverage("train"))  # every picture has both kinds of pixel
        for i, rid in enumerate(ids):
            picture, mask = np.asarray(prep.train[i]["image"].convert("RGB")), masks.image("train", rid)
            assert (seen[i][~mask] == np.array(FILL, np.uint8)).all() and np.array_equal(seen[i][mask], picture[mask])
        masked = load_file(str(variant_cache_path(cache, "masked")))["masked_image_embeds"]
        assert torch.equal(run.feats["image_embeds"], masked)
        batch, _ = step_batch(run, 0)
        b = run.batch_size
        rows = epoch_order(len(ids), 0, run.config.seed, b)[:b]
        keep = run.pairs.self_mask(b, seed=run.config.seed, step=0)
        null = run.feats["null_image_embeds"][0]
        reference = torch.as_tensor(run.pairs.reference)[rows]
        for k in range(b):
            if not torch.equal(batch["image_embeds"][k], null):  # not dropped out
                expected = masked[rows[k]] if keep[k] else masked[reference[k]]
                assert torch.equal(batch["image_embeds"][k], expected)
            assert torch.equal(batch["latent_mask"][k], torch.from_numpy(masks.latent("train", ids[rows[k]])))
        assert (~keep).any() and (reference != rows).all()
    finally:
        release(run)


def test_mirror_pairing_encodes_the_masked_picture_mirrored(tiny_profile, data, tmp_path, monkeypatch):
    prep, cache, folder, masks = data
    seen, real_encode = [], features_module.encode_images
    monkeypatch.setattr(features_module, "encode_images",
                        lambda pipe, images: seen.append([np.asarray(im) for im in images]) or real_encode(pipe, images))
    run = prepare_run(config(folder, tmp_path / "run", mask="reference", pairing="mirror"), progress=False)
    try:
        mirrored = load_file(str(variant_cache_path(cache, "masked_mirror")))["masked_mirror_image_embeds"]
        assert torch.equal(run.pairs.mirror_embeds, mirrored) and run.masking.loss_masks is None
        flat = [im for batch in seen for im in batch]
        first = prep.train[0]["image"].convert("RGB")
        filled = np.where(masks.image("train", prep.train[0]["id"])[..., None], np.asarray(first), np.uint8(255))
        assert any(np.array_equal(im, np.asarray(ImageOps.mirror(Image.fromarray(filled)))) for im in flat)
    finally:
        release(run)


# --------------------------------------------------------------------------------------------------
# Resume, the command line, folders, cost
# --------------------------------------------------------------------------------------------------


def test_a_changed_mask_refuses_to_resume_and_the_masked_loss_trains_otherwise(data, none_run, tmp_path, capsys):
    out = tmp_path / run_name("text_aware", "self", "loss")
    masked = train(config(data[2], out, mask="loss"), progress=False)
    said = capsys.readouterr().out
    assert "MASK = 'loss', an opt-in run" in said and "3 training steps of text_aware" in said
    assert masked.losses != none_run.losses  # same noise and rows: only the weights differ
    settings = json.loads((out / "config.json").read_text())
    assert settings["mask"] == "loss" and settings["mask_background_weight"] == 0.1
    assert settings["masks"] == data[3].meta["fingerprint"][:16]
    for other in ("both", "none"):
        with pytest.raises(TrainingError, match=rf"mask \(MASK: none, reference, loss or both\) 'loss' there, "
                                                rf"'{other}' now"):
            train(config(data[2], out, mask=other, max_steps=4), progress=False)
    assert {"mask", "masks", "mask_background_weight"} <= set(RESUME_SETTINGS)
    with pytest.raises(TrainingError, match=r"unknown mask 'all': choose one of none, reference, loss, both"):
        train(config(data[2], tmp_path / "x", mask="all"), progress=False)


def test_masked_runs_have_their_own_folders_and_registry_names_outside_the_default_grid():
    assert MASKS == ("none", "reference", "loss", "both")
    for mask in MASKS[1:]:
        name = f"finetuned-text-aware-mask-{mask}"
        assert FINETUNED[name] == (run_name("text_aware", "self", mask), "text_aware") and MODELS[name].mask == mask
        assert masked_twins()[name] == "finetuned-text-aware" and name not in GRID_MODELS
    assert run_name("text_aware", "neighbour", "both") == "text_aware_neighbour-mask_both"
    assert run_name("vanilla") == "vanilla" and run_name("text_aware", "mirror") == "text_aware_mirror"
    line = cost_line("both", "text_aware", 60, 100, gpus=2, mirror=True)
    assert line.startswith("MASK = 'both', an opt-in run, projected on 2 T4s") and "200 pictures" in line
