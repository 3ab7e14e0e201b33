"""helpers.train: the loss goes down, only the adapter trains, runs resume exactly, failures are clear."""
import dataclasses
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from safetensors.torch import load_file

import helpers.data.features as features_module
import helpers.train.loop as loop_module
import helpers.train.run as run_module
import helpers.train.step as step_module
from helpers.data.features import encode_batch, load_feature_cache, prepare_for_training
from helpers.model.adapter_file import ADAPTER_FILE, save_adapter
from helpers.model.official_format import adapter_parameters, adapter_state_dict
from helpers.model.pipeline import load_pipeline, load_unet
from helpers.train.__main__ import main as train_main
from helpers.train.checkpoints import list_checkpoints
from helpers.train.config import TrainConfig
from helpers.train.loop import train
from helpers.train.loss import diffusion_loss
from helpers.train.loss_log import LOSS_LOG, read_loss_log
from helpers.train.run import TrainingError
from helpers.train.step import training_step


@pytest.fixture(scope="module")
def data_dir(tiny_profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    prepare_for_training(tiny_profile, folder, progress=False)
    return folder


def config(tmp_path, data_dir, **kw):
    kw = {"variant": "text_aware", "profile": "tiny", "max_steps": 4, "checkpoint_every": 2, **kw}
    return TrainConfig(output_dir=str(tmp_path / "run"), data_dir=str(data_dir), **kw)


def adapter_names(unet):
    """unet.named_parameters() names of the adapter's parameters (helpers.model.adapter_file.adapter_parameters)."""
    ids = {id(p) for p in adapter_parameters(unet).values()}
    return {n for n, p in unet.named_parameters() if id(p) in ids}


def train_keeping_model(cfg, monkeypatch):
    """train(cfg), and the trained UNet it hands to save_adapter (the main process's model)."""
    kept, real_save = {}, save_adapter

    def save(model, path, **kw):
        kept["model"] = model
        return real_save(model, path, **kw)

    monkeypatch.setattr(loop_module, "save_adapter", save)
    return train(cfg, progress=False), kept["model"]


def test_overfitting_a_small_batch_lowers_the_loss(tiny_profile, data_dir):
    feats, _ = load_feature_cache(data_dir / "train_features.safetensors")
    unet = load_unet(tiny_profile.base_model, tiny_profile.ip_adapter, variant="text_aware",
                     image_encoder_dim=feats["image_embeds"].shape[-1], device="cpu", dtype=torch.float32)
    unet.requires_grad_(False)
    params = adapter_parameters(unet)
    for p in params.values():
        p.requires_grad_(True)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_profile.base_model, subfolder="scheduler")
    batch = {k: feats[k][:4].float() for k in ("latent_mean", "latent_std", "text_embeds", "image_embeds")}
    opt = torch.optim.AdamW(params.values(), lr=3e-3)

    def loss():  # the same noise and timesteps every time: a fixed target to fit
        return diffusion_loss(unet, scheduler, batch, torch.Generator().manual_seed(0), 0.18215)

    with torch.no_grad():
        before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.9 * before, (before, after)  # measured here: 1.099 -> ~0.88


def test_only_adapter_parameters_change_and_the_adapter_loads(tiny_profile, data_dir, tmp_path, monkeypatch):
    result, model = train_keeping_model(config(tmp_path, data_dir, max_steps=2), monkeypatch)
    fresh = load_unet(tiny_profile.base_model, tiny_profile.ip_adapter, variant="text_aware", image_encoder_dim=32,
                      device="cpu", dtype=torch.float32)
    trained = dict(model.named_parameters())
    names = adapter_names(fresh)
    assert any(n.startswith("text_image_attn.") for n in names) and any(".to_k_ip." in n for n in names)
    for name, p in fresh.named_parameters():
        if name in names:
            continue
        assert torch.equal(trained[name], p), f"frozen {name} changed"
    changed = [n for n in names if not torch.equal(trained[n], fresh.get_parameter(n))]
    assert len(changed) > 0.9 * len(names)
    assert torch.count_nonzero(trained["text_image_attn.to_out.weight"]) > 0  # the block trained (it starts at 0)
    pipe = load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, variant="text_aware", adapter=result.adapter)
    loaded, saved = adapter_state_dict(pipe.unet), adapter_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert pipe.adapter_info["variant"] == "text_aware" and '"max_steps": 2' in pipe.adapter_info["training_config"]
    log = read_loss_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and [r["loss"] for r in log] == pytest.approx(result.losses, abs=1e-6)


def log_rows(run_dir):
    path = run_dir / LOSS_LOG
    return len(read_loss_log(run_dir)) if path.is_file() else 0


def test_interrupted_run_falls_back_past_a_cut_checkpoint_and_resumes_exactly(data_dir, tmp_path, monkeypatch, capsys):
    real_step, rows_before_step = training_step, []

    def counting_step(run, step):  # how many rows the log file holds when each step starts
        rows_before_step.append(log_rows(run.out))
        return real_step(run, step)

    monkeypatch.setattr(loop_module, "training_step", counting_step)
    whole = train(config(tmp_path / "a", data_dir, max_steps=7), progress=False)
    assert rows_before_step == [0, 0, 2, 2, 4, 4, 6]  # written at the checkpoints (every 2), not at every step
    monkeypatch.setattr(loop_module, "training_step", real_step)

    real_loss, calls = diffusion_loss, []

    def crash_at_step_6(*args, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the Colab session dies after the checkpoints at steps 2 and 4, and step 5
        return real_loss(*args, **kw)

    monkeypatch.setattr(step_module, "diffusion_loss", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", data_dir, max_steps=7), progress=False)
    monkeypatch.setattr(step_module, "diffusion_loss", real_loss)
    run_b = tmp_path / "b" / "run"
    assert not (run_b / ADAPTER_FILE).exists() and log_rows(run_b) == 5  # the rows after step 4 were flushed
    (run_b / "checkpoints" / "ckpt-000004" / "state.pt").unlink()  # and Drive never got the newest state.pt
    capsys.readouterr()
    resumed = train(config(tmp_path / "b", data_dir, max_steps=7), progress=False)
    out = capsys.readouterr().out
    assert "ckpt-000004 is incomplete (state.pt is missing)" in out and "falling back to ckpt-000002" in out
    assert "Resuming from" in out and resumed.resumed_from == 2
    a, b = load_file(str(whole.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {run: [r["loss"] for r in read_loss_log(tmp_path / run / "run")] for run in "ab"}
    assert len(losses["b"]) == 7 and losses["a"] == losses["b"]  # the log was rewound to the checkpoint, then refilled


def test_a_rerun_with_other_settings_refuses_and_fresh_start_starts_over(data_dir, tmp_path, capsys):
    first = train(config(tmp_path, data_dir, max_steps=2), progress=False)
    with pytest.raises(TrainingError, match=r"ckpt-000002 was written with other settings than this run's: batch "
                                              r"size 4 there, 2 now; learning rate 0\.0001 there, 0\.001 now\..*"
                                              r"FRESH_START = True.*--fresh-start"):
        train(config(tmp_path, data_dir, max_steps=2, batch_size=2, learning_rate=1e-3), progress=False)
    assert first.adapter.is_file() and log_rows(tmp_path / "run") == 2  # the refused rerun touched nothing
    capsys.readouterr()
    again = train(config(tmp_path, data_dir, max_steps=2, batch_size=2, fresh_start=True), progress=False)
    out = capsys.readouterr().out
    assert "Fresh start: deleted the earlier run's ckpt-000002" in out and "loss_log.csv, adapter.safetensors" in out
    assert again.resumed_from == 0 and len(again.losses) == 2
    assert [r["loss"] for r in read_loss_log(tmp_path / "run")] == pytest.approx(again.losses, abs=1e-6)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 2


def tensors_and_modules(obj, where="result", seen=None) -> list[str]:
    """Where in obj (dataclasses, lists, tuples, dicts, followed recursively) a tensor or a module sits."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return [where]
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return []
    return [hit for k, v in items for hit in tensors_and_modules(v, f"{where}.{k}", seen)]


def test_nothing_of_a_run_outlives_train_even_when_it_is_interrupted(data_dir, tmp_path, monkeypatch):
    unets, real_load = [], load_unet

    def load_and_watch(*args, **kw):
        unet = real_load(*args, **kw)
        unets.append(weakref.ref(unet))
        return unet

    monkeypatch.setattr(run_module, "load_unet", load_and_watch)
    result = train(config(tmp_path, data_dir, max_steps=2), progress=False)
    assert tensors_and_modules(result) == [] and result.trainable_parameters > 0 and result.checkpoint_bytes > 0
    gc.collect()
    assert unets[0]() is None, "the trained UNet is still referenced after train() returned"

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(step_module, "diffusion_loss", interrupted)
    with pytest.raises(KeyboardInterrupt) as kept:  # a notebook keeps the traceback of the last error too
        train(config(tmp_path / "b", data_dir, max_steps=2), progress=False)
    gc.collect()
    assert kept.value is not None and unets[1]() is None, "the interrupted run's UNet lives on in its traceback"


def test_cli_trains_on_own_images_and_leaves_their_prepared_folder_as_it_was(tmp_path, monkeypatch, capsys):
    """Notebook 01 prepared the user's images: training must use them (not the profile's dataset) and must
    not touch the prepared splits (it only adds the feature cache beside them)."""
    from _own_data import own_images

    from helpers.data.prepare import prepare_dataset

    captions = own_images(tmp_path / "my_drawings")
    prep = prepare_dataset(tmp_path / "my_drawings", tmp_path / "data", resolution=64, test_fraction=0.1,
                           progress=False)
    before = file_hashes(tmp_path / "data")
    encoded, real_encode = [], encode_batch

    def encode_and_note(pipe, images, texts, resolution):
        encoded.extend(texts)
        return real_encode(pipe, images, texts, resolution)

    monkeypatch.setattr(features_module, "encode_batch", encode_and_note)
    args = ["--profile", "tiny", "--variant", "vanilla", "--data-dir", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--checkpoint-every", "2"]
    result = train_main(args)
    assert "Using the data notebook 01 prepared in" in capsys.readouterr().out
    train_captions = [captions[i] for i in prep.train["id"]]
    assert len(encoded) == 10 and encoded == train_captions  # 12 images, 2 held out: the cache is of the other 10
    _, meta = load_feature_cache(tmp_path / "data" / "train_features.safetensors")
    assert json.loads(meta["ids"]) == list(prep.train["id"]) and result.steps == 2
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    assert settings["train_images"] == 10 and settings["data_source"] == str(tmp_path / "my_drawings")
    after = file_hashes(tmp_path / "data")
    assert after.pop("train_features.safetensors") and after == before  # byte for byte, nothing else added
    with pytest.raises(SystemExit, match=r"error: .*data holds data prepared from .*my_drawings at 64 px.*resolution "
                                         r"128 \(the folder has 64\)"):
        train_main(args + ["--resolution", "128"])
    assert file_hashes(tmp_path / "data") == {**before, "train_features.safetensors": ANY}


def file_hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    real_loss, calls = diffusion_loss, []

    def nan_at_step_3(*args, **kw):
        calls.append(1)
        out = real_loss(*args, **kw)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(step_module, "diffusion_loss", nan_at_step_3)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*ckpt-000002"):
        train(config(tmp_path, data_dir, max_steps=4), progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]


def test_cli_under_torchrun_two_processes_builds_data_and_writes_once(tmp_path):
    """Fresh output root: the CLI prepares data and cache itself; two CPU processes train data-parallel."""
    env = {**os.environ, "IPA_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: another run of this test (the Colab-versions venv) may hold one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "helpers.train", "--profile", "tiny", "--variant", "vanilla",
           "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--checkpoint-every", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "outputs" / "data" / "train_features.safetensors").is_file()
    assert (tmp_path / "run" / ADAPTER_FILE).is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_processes"] == 2
    assert len(read_loss_log(tmp_path / "run")) == 2  # one row per step, written by the main process only


def test_gradient_checkpointing_gives_the_same_step(data_dir, tmp_path, monkeypatch):
    """Checkpointing recomputes activations; gradients must still reach the adapter inside every block."""
    _, plain = train_keeping_model(config(tmp_path / "a", data_dir, max_steps=1), monkeypatch)
    _, ckpt = train_keeping_model(config(tmp_path / "b", data_dir, max_steps=1, gradient_checkpointing=True), monkeypatch)
    a, b = dict(plain.named_parameters()), dict(ckpt.named_parameters())
    for name in adapter_names(plain):
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(b["text_image_attn.to_out.weight"]) > 0
