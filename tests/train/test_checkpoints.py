"""helpers.train.checkpoints: complete vs cut-off checkpoints, verified ones, the fallback, the settings check,
the size, and the disk space a save needs."""
import errno
import hashlib
import json
import shutil

import pytest
import torch
from _train_disk import fake_disk

import helpers.train.checkpoints as checkpoints_module
from helpers.support.disk import MB, DiskFull
from helpers.train.checkpoints import (
    CHECKPOINTS,
    MANIFEST,
    STATE,
    WEIGHTS,
    SettingsMismatch,
    checkpoint_bytes,
    checkpoint_problem,
    checkpoint_room,
    delete_checkpoints,
    drive_space,
    folder_bytes,
    list_checkpoints,
    load_checkpoint,
    resume_from,
    save_checkpoint,
)


def model_and_optimizer(seed=0, sizes=(300, 7)):
    """A few fp32 parameters and an AdamW that has taken one step (so it has state to save)."""
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.nn.Parameter(torch.randn(n, generator=g)) for i, n in enumerate(sizes)}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return params, opt


BIG = (300_000, 7)  # 3.6 MB a checkpoint: file headers are small beside it, as at real size


def write(out, step, seed=0, settings=None, keep=5, sizes=(300, 7)):
    params, opt = model_and_optimizer(seed, sizes)
    return save_checkpoint(out, step, params, opt, None, keep, settings=settings or {"batch_size": 4})


def test_a_checkpoint_with_a_file_missing_or_short_is_incomplete(tmp_path):
    first, second = write(tmp_path, 2), write(tmp_path, 4, seed=1)
    assert checkpoint_problem(second) is None and [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    (second / STATE).unlink()  # the Drive sync was cut before state.pt arrived
    assert checkpoint_problem(second) == "state.pt is missing"
    data = (first / WEIGHTS).read_bytes()
    (first / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(first) == f"trainable.safetensors has {len(data) // 2} of {len(data)} bytes"
    assert list_checkpoints(tmp_path) == [] and len(list_checkpoints(tmp_path, complete=False)) == 2


def test_resume_falls_back_to_the_previous_complete_checkpoint_and_says_so(tmp_path):
    write(tmp_path, 2, seed=2)
    newest = write(tmp_path, 4, seed=4)
    (newest / MANIFEST).unlink()  # cut before the last file
    params, opt = model_and_optimizer(seed=9)
    said = []
    step, path, state = resume_from(tmp_path, {"batch_size": 4}, {"batch_size": "batch size"}, params, opt,
                                      say=said.append)
    assert (step, path.name, state["step"]) == (2, "ckpt-000002", 2)
    assert len(said) == 1 and "ckpt-000004 is incomplete (checkpoint.json is missing)" in said[0]
    assert "falling back to ckpt-000002" in said[0]
    expected, _ = model_and_optimizer(seed=2)
    assert all(torch.equal(params[k], expected[k]) for k in params)


def test_a_damaged_checkpoint_changes_nothing_and_none_left_means_step_0(tmp_path):
    only = write(tmp_path, 2, seed=2)
    (only / STATE).write_bytes(b"x" * (only / STATE).stat().st_size)  # right size, garbage inside
    params, opt = model_and_optimizer(seed=9)
    before = {k: p.detach().clone() for k, p in params.items()}
    said = []
    assert resume_from(tmp_path, {}, {}, params, opt, say=said.append) == (0, None, {})
    assert "is damaged (state.pt differs from the sha256" in said[0] and "starting from step 0" in said[0]
    assert all(torch.equal(params[k], before[k]) for k in params)  # the weights were not half-loaded
    drop_hashes(only)  # a checkpoint from before the hashes were recorded: torch.load finds the garbage
    said.clear()
    assert resume_from(tmp_path, {}, {}, params, opt, say=said.append) == (0, None, {})
    assert "unreadable: UnpicklingError" in said[0] and all(torch.equal(params[k], before[k]) for k in params)


def drop_hashes(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["sha256"]
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_each_file_carries_the_sha256_of_its_bytes_and_a_checkpoint_without_them_still_loads(tmp_path):
    folder = write(tmp_path, 2, seed=2)
    hashes = json.loads((folder / MANIFEST).read_text())["sha256"]
    assert hashes == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in (WEIGHTS, STATE)}
    drop_hashes(folder)  # written by an older version: checked by size only, and loaded
    params, opt = model_and_optimizer(seed=9)
    assert load_checkpoint(folder, params, opt)["step"] == 2
    expected, _ = model_and_optimizer(seed=2)
    assert all(torch.equal(params[k], expected[k]) for k in params)


def test_a_zeroed_tail_of_the_right_size_falls_back_naming_the_file_and_is_deleted(tmp_path):
    """A checkpoint judged complete by its sizes, whose weights' last third is zeros: before the hashes it
    loaded without a word, with a third of the weights zero."""
    write(tmp_path, 2, seed=2)
    newest = write(tmp_path, 4, seed=4)
    data = bytearray((newest / WEIGHTS).read_bytes())
    third = len(data) // 3
    data[-third:] = bytes(third)
    (newest / WEIGHTS).write_bytes(bytes(data))
    assert checkpoint_problem(newest) is None  # the sizes cannot tell
    params, opt = model_and_optimizer(seed=9)
    said = []
    step, path, _ = resume_from(tmp_path, {}, {}, params, opt, say=said.append, discard=True)
    assert (step, path.name) == (2, "ckpt-000002")
    assert len(said) == 1 and "ckpt-000004 is damaged (trainable.safetensors differs from the sha256" in said[0]
    assert "falling back to ckpt-000002" in said[0] and not newest.exists()  # discard: this run writes it again
    expected, _ = model_and_optimizer(seed=2)
    assert all(torch.equal(params[k], expected[k]) for k in params)


def test_other_settings_are_refused_naming_both_values(tmp_path):
    write(tmp_path, 2, settings={"batch_size": 4, "learning_rate": 1e-4, "variant": "text_aware"})
    params, opt = model_and_optimizer()
    must = {"batch_size": "batch size", "learning_rate": "learning rate", "variant": "variant"}
    with pytest.raises(SettingsMismatch, match=r"batch size 4 there, 2 now; learning rate 0\.0001 there, 0\.0003 now"
                                                 r".*FRESH_START.*--fresh-start"):
        resume_from(tmp_path, {"batch_size": 2, "learning_rate": 3e-4, "variant": "text_aware"}, must, params, opt)


def test_saving_keeps_the_newest_complete_ones_and_drops_incomplete_ones(tmp_path):
    for step in (1, 2, 3):
        write(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / CHECKPOINTS / "ckpt-000003" / WEIGHTS).unlink()
    write(tmp_path, 4, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path, complete=False)] == [2, 4]
    gone = delete_checkpoints(tmp_path)
    assert [p.name for p, _ in gone] == ["ckpt-000002", "ckpt-000004"] and all(size > 0 for _, size in gone)
    assert list_checkpoints(tmp_path, complete=False) == []


def test_checkpoint_size_is_12_bytes_per_trainable_parameter(tmp_path):
    """The estimate notebook 03 prints for Drive: weights + AdamW's two moments, all fp32."""
    params, opt = model_and_optimizer(sizes=(400_000, 100_000, 768))
    path = save_checkpoint(tmp_path, 1, params, opt, None, 2)
    n = sum(p.numel() for p in params.values())
    on_disk = sum(f.stat().st_size for f in path.iterdir())
    assert checkpoint_bytes(n) <= on_disk < checkpoint_bytes(n) * 1.01 + 20_000
    space = drive_space(n, max_steps=714, every=200, keep=2)  # the full profile: 6 epochs of 119 steps
    assert space["written"] == 4 and space["kept"] == 2 * checkpoint_bytes(n) == space["trashed"]


def test_keep_1_continues_a_run_holding_two_checkpoints_on_a_disk_with_room_for_one_more(tmp_path, monkeypatch):
    write(tmp_path, 2, seed=2, keep=2, sizes=BIG)
    write(tmp_path, 4, seed=4, keep=2, sizes=BIG)
    one = folder_bytes(tmp_path / CHECKPOINTS / "ckpt-000004")
    fake_disk(monkeypatch, tmp_path, free_now=one // 2)  # full: the two checkpoints and half of a third
    params, opt = model_and_optimizer(seed=6, sizes=BIG)
    with pytest.raises(OSError, match="No space left"):  # what saving before pruning meets
        checkpoints_module._write(tmp_path / "probe", b"x" * one)
    said = []
    save_checkpoint(tmp_path, 6, params, opt, None, keep=1, say=said.append)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6] and not list(tmp_path.rglob(".ckpt-*"))
    assert len(said) == 1 and said[0].startswith("Deleted ckpt-000002") and "to make room for checkpoint ckpt-000006" in said[0]


def test_no_room_even_after_pruning_stops_naming_the_folder_and_deletes_nothing(tmp_path, monkeypatch):
    for step in (2, 4):
        write(tmp_path, step, seed=step, keep=3, sizes=BIG)
    fake_disk(monkeypatch, tmp_path, free_now=1000)
    params, opt = model_and_optimizer(seed=6, sizes=BIG)
    needed, freed = checkpoint_room(sum(BIG)) / MB, folder_bytes(tmp_path / CHECKPOINTS / "ckpt-000002") / MB
    with pytest.raises(DiskFull, match=rf"Not enough disk space in {tmp_path} for checkpoint ckpt-000006: 0\.0 MB "
                                        rf"free, {needed:.1f} MB needed; deleting the older checkpoints would free only "
                                        rf"{freed:.1f} MB more\. .*--keep-checkpoints 1.*trash"):
        save_checkpoint(tmp_path, 6, params, opt, None, keep=2)  # keep 2: it may prune down to 1, which is not enough
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]


def test_a_full_disk_while_writing_names_the_file_and_keeps_what_was_there(tmp_path, monkeypatch):
    first = write(tmp_path, 2, seed=2)
    real_write = checkpoints_module._write

    def full_at_state(path, data):
        if path.name == STATE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(checkpoints_module, "_write", full_at_state)
    params, opt = model_and_optimizer(seed=4)
    with pytest.raises(DiskFull, match=r"The disk is full: could not write .*ckpt-000004/state\.pt.*trash"):
        save_checkpoint(tmp_path, 4, params, opt, None, keep=2)
    assert list_checkpoints(tmp_path) == [(2, first)] and not list((tmp_path / CHECKPOINTS).glob(".ckpt-*"))
    params, opt = model_and_optimizer(seed=9)
    assert load_checkpoint(first, params, opt)["step"] == 2  # still complete, and verified
