"""helpers.train: the loss goes down, only the adapter trains, runs resume exactly, failures are clear; after a
fault (a full disk, a kill -9 mid-save, a damaged checkpoint, a second writer, out of memory) the same command
ends as an uninterrupted run does."""
import dataclasses
import errno
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from _train_disk import fake_disk
from safetensors.torch import load_file

import helpers.data.features as features_module
import helpers.train.checkpoints as checkpoints_module
import helpers.train.loop as loop_module
import helpers.train.run as run_module
import helpers.train.step as step_module
from helpers.data.features import encode_batch, load_feature_cache, prepare_for_training
from helpers.model.adapter_file import ADAPTER_FILE, save_adapter
from helpers.model.official_format import adapter_parameters, adapter_state_dict
from helpers.model.pipeline import load_pipeline, load_unet
from helpers.train.__main__ import main as train_main
from helpers.support.disk import MB
from helpers.train.checkpoints import adapter_bytes, checkpoint_room, folder_bytes, list_checkpoints
from helpers.train.config import RESUME_SETTINGS, TrainConfig
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
    with pytest.raises(TrainingError, match=r"ckpt-000002 was written with other settings than this run's: global "
                                              r"batch size \(all processes together\) 4 there, 2 now; learning rate "
                                              r"0\.0001 there, 0\.001 now\..*"
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


def test_gradient_checkpointing_gives_the_same_step(data_dir, tmp_path, monkeypatch):
    """Checkpointing recomputes activations; gradients must still reach the adapter inside every block."""
    _, plain = train_keeping_model(config(tmp_path / "a", data_dir, max_steps=1), monkeypatch)
    _, ckpt = train_keeping_model(config(tmp_path / "b", data_dir, max_steps=1, gradient_checkpointing=True), monkeypatch)
    a, b = dict(plain.named_parameters()), dict(ckpt.named_parameters())
    for name in adapter_names(plain):
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(b["text_image_attn.to_out.weight"]) > 0


# --- faults: after each, what was complete stays complete, and the same command ends as an uninterrupted run ---


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
    """The uninterrupted run the faults are compared with: 6 steps, checkpoints at 2, 4 and 6, all kept."""
    tmp = tmp_path_factory.mktemp("whole")
    result = train(config(tmp, data_dir, max_steps=6, keep_checkpoints=3), progress=False)
    return result, load_file(str(result.adapter)), [r["loss"] for r in read_loss_log(result.adapter.parent)]


def copy_of_whole_run(whole_run, tmp_path, *, drop=()):
    """A copy of the uninterrupted run's folder at tmp_path/run, less the checkpoints and files named in drop."""
    run_dir = tmp_path / "run"
    shutil.copytree(whole_run[0].adapter.parent, run_dir)
    for name in drop:
        path = run_dir / "checkpoints" / name if name.startswith("ckpt-") else run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run_dir


def assert_ends_as_the_whole_run(result, whole_run):
    expected, losses = whole_run[1], whole_run[2]
    got = load_file(str(result.adapter))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert [r["loss"] for r in read_loss_log(result.adapter.parent)] == losses


def test_a_zeroed_checkpoint_tail_falls_back_naming_the_file(data_dir, whole_run, tmp_path, capsys):
    run_dir = copy_of_whole_run(whole_run, tmp_path)
    weights = run_dir / "checkpoints" / "ckpt-000006" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    third = len(data) // 3
    data[-third:] = bytes(third)  # the right size: complete by its sizes, a third of it zeros
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    result = train(config(tmp_path, data_dir, max_steps=6, keep_checkpoints=3), progress=False)
    out = capsys.readouterr().out
    assert "ckpt-000006 is damaged (trainable.safetensors differs from the sha256 that checkpoint.json recorded" in out
    assert "falling back to ckpt-000004" in out and result.resumed_from == 4
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4, 6]
    assert_ends_as_the_whole_run(result, whole_run)


KILLED_MID_SAVE = """
import sys, time
from pathlib import Path
import helpers.train.checkpoints as checkpoints
real_write = checkpoints._write
def write(path, data):  # the save of step 6 stops half way through state.pt, until the process is killed
    if path.name == checkpoints.STATE and ".ckpt-000006.tmp-" in path.parent.name:
        path.write_bytes(bytes(data)[:len(data) // 2])
        Path(sys.argv[1]).touch()
        time.sleep(300)
    return real_write(path, data)
checkpoints._write = write
from helpers.train.__main__ import main
main(sys.argv[2:])
"""


def test_kill_9_during_a_save_leaves_the_earlier_checkpoints_and_a_rerun_ends_as_an_uninterrupted_run(
        data_dir, whole_run, tmp_path, monkeypatch, capsys):
    run_dir, ready = copy_of_whole_run(whole_run, tmp_path, drop=("ckpt-000006", ADAPTER_FILE)), tmp_path / "mid-save"
    before = file_hashes(run_dir / "checkpoints")
    args = ["--profile", "tiny", "--variant", "text_aware", "--data-dir", str(data_dir), "--output-dir", str(run_dir),
            "--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(ready), *args], env=env,
                            cwd=Path(__file__).parents[2], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no save in 120 s"
    finally:
        proc.kill()  # SIGKILL: no finally, no cleanup
        proc.wait()
    temporary = run_dir / "checkpoints" / f".ckpt-000006.tmp-{proc.pid}"
    assert (temporary / "trainable.safetensors").is_file() and (temporary / "state.pt").is_file()
    assert file_hashes(run_dir / "checkpoints") == {**before, **{  # ckpt 2 and 4 as they were, and the half save
        f"{temporary.name}/{name}": ANY for name in ("trainable.safetensors", "state.pt")}}
    assert json.loads((run_dir / ".lock.json").read_text())["pid"] == proc.pid  # the killed run held the folder
    capsys.readouterr()  # the same command again, at once: the killed writer's process is gone from this machine
    result = train(config(tmp_path, data_dir, max_steps=6, keep_checkpoints=3), progress=False)
    out = capsys.readouterr().out
    assert f"taking over the lock of pid {proc.pid}" in out and "process is gone" in out and result.resumed_from == 4
    assert not temporary.exists() and not (run_dir / ".lock.json").exists()
    assert_ends_as_the_whole_run(result, whole_run)


def test_a_full_disk_at_a_save_names_the_file_and_a_rerun_ends_as_an_uninterrupted_run(data_dir, whole_run, tmp_path,
                                                                                         monkeypatch):
    run_dir = copy_of_whole_run(whole_run, tmp_path, drop=("ckpt-000006", ADAPTER_FILE))  # stopped after step 4
    real_write = checkpoints_module._write

    def full_at_state(path, data):
        if path.name == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(checkpoints_module, "_write", full_at_state)
    with pytest.raises(TrainingError, match=r"The disk is full: could not write ckpt-000006/state\.pt \(.*run/"
                                            r"checkpoints/ckpt-000006/state\.pt\).*Empty trash"):
        train(config(tmp_path, data_dir, max_steps=6, keep_checkpoints=3), progress=False)
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4] and not list(run_dir.rglob(".ckpt-*"))
    monkeypatch.setattr(checkpoints_module, "_write", real_write)
    assert_ends_as_the_whole_run(train(config(tmp_path, data_dir, max_steps=6, keep_checkpoints=3), progress=False),
                                 whole_run)


def test_keep_1_continues_a_run_holding_two_checkpoints_on_a_disk_with_room_for_one_more(data_dir, whole_run, tmp_path,
                                                                                         monkeypatch, capsys):
    run_dir = copy_of_whole_run(whole_run, tmp_path, drop=("ckpt-000006", ADAPTER_FILE))  # holds ckpt 2 and 4
    one = folder_bytes(run_dir / "checkpoints" / "ckpt-000004")
    fake_disk(monkeypatch, tmp_path, free_now=one // 2)  # full: two checkpoints and half of a third
    capsys.readouterr()
    result = train(config(tmp_path, data_dir, max_steps=6, keep_checkpoints=1), progress=False)
    assert "Deleted ckpt-000002" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(run_dir)] == [6]
    assert_ends_as_the_whole_run(result, whole_run)


def test_no_room_for_a_run_stops_before_training_naming_the_folder(data_dir, whole_run, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    fake_disk(monkeypatch, tmp_path, free_now=1000)
    n = whole_run[0].trainable_parameters
    needed = (checkpoint_room(n) + adapter_bytes(n)) / MB
    with pytest.raises(TrainingError, match=rf"Not enough disk space in {tmp_path / 'run'} for this run \(one "
                                            rf"checkpoint and the adapter\): 0\.0 MB free, {needed:.1f} MB needed\. "
                                            r"Free some space .*Empty trash"):
        train(config(tmp_path, data_dir, max_steps=6), progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # nothing written, the lock given back


LOCK_HOLDER = """
import sys, time
from helpers.support.lock import FolderLock
with FolderLock(sys.argv[1], "training text_aware (notebook 03)"):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_writer_on_a_run_folder_stops_at_once_and_deletes_nothing(data_dir, whole_run, tmp_path):
    run_dir = copy_of_whole_run(whole_run, tmp_path)
    before = file_hashes(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline() == "held\n"
        t0 = time.perf_counter()
        with pytest.raises(TrainingError, match=rf"{run_dir} is in use by pid {holder.pid} on .* \(training text_aware "
                                                r"\(notebook 03\)\) since .*IPA_BREAK_LOCK=1"):
            train(config(tmp_path, data_dir, max_steps=6, keep_checkpoints=3, fresh_start=True), progress=False)
        assert time.perf_counter() - t0 < 5  # at once: before the data, the model or the fresh start
        with pytest.raises(SystemExit, match=rf"error: {run_dir} is in use by pid {holder.pid}"):
            train_main(["--profile", "tiny", "--data-dir", str(data_dir), "--output-dir", str(run_dir)])
    finally:
        holder.kill()
        holder.wait()
    after = file_hashes(run_dir)
    assert after.pop(".lock.json") and after == before  # the fresh start deleted nothing


SECOND_WRITER = """
import sys
from helpers.support.lock import FolderInUse, FolderLock
try:
    FolderLock(sys.argv[1], "python -m helpers.train").acquire()
except FolderInUse as e:
    print(e)
"""


def test_a_training_run_holds_its_folder_from_before_a_fresh_start_to_its_end(data_dir, tmp_path, monkeypatch):
    refusals = []

    def prepare_with_a_second_writer(config, **kw):  # prepare_run: the data, the fresh start, the model
        refusals.append(subprocess.run([sys.executable, "-c", SECOND_WRITER, config.output_dir], capture_output=True,
                                       text=True, cwd=Path(__file__).parents[2]).stdout)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "prepare_run", prepare_with_a_second_writer)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, data_dir, fresh_start=True), progress=False)
    assert f"{tmp_path / 'run'} is in use by pid {os.getpid()}" in refusals[0] and "(training text_aware)" in refusals[0]
    assert not (tmp_path / "run" / ".lock.json").exists()  # given back, also when interrupted


def test_out_of_memory_names_the_setting_a_resume_accepts(data_dir, tmp_path, monkeypatch):
    real_loss, calls = diffusion_loss, []

    def out_of_memory_at_step_2(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(*args, **kw)

    monkeypatch.setattr(step_module, "diffusion_loss", out_of_memory_at_step_2)
    with pytest.raises(TrainingError, match=r"out of GPU memory at step 2, batch size 4 per process \(no\)\. Turn on "
                                            r"gradient checkpointing \(--gradient-checkpointing, GRADIENT_CHECKPOINTING.*"
                                            r"a resume accepts it, and it resumes from ckpt-000001\. A smaller batch "
                                            r"\(--batch-size, BATCH_SIZE\) changes the recipe, which a resume refuses: "
                                            r"it needs --fresh-start \(FRESH_START"):
        train(config(tmp_path, data_dir, max_steps=2, checkpoint_every=1), progress=False)
    assert "gradient_checkpointing" not in RESUME_SETTINGS and "global_batch_size" in RESUME_SETTINGS  # as advised
    resumed = train(config(tmp_path, data_dir, max_steps=1, checkpoint_every=1, gradient_checkpointing=True),
                    progress=False)
    assert resumed.resumed_from == 1  # the advice keeps the run: a resume with checkpointing on is accepted
