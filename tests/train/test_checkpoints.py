"""helpers.train.checkpoints: complete vs cut-off checkpoints, the fallback, the settings check, the size."""
import pytest
import torch

from helpers.train.checkpoints import (
    CHECKPOINTS,
    MANIFEST,
    STATE,
    WEIGHTS,
    SettingsMismatch,
    checkpoint_bytes,
    checkpoint_problem,
    delete_checkpoints,
    drive_space,
    list_checkpoints,
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


def write(out, step, seed=0, settings=None, keep=5):
    params, opt = model_and_optimizer(seed)
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
    assert "unreadable" in said[0] and "starting from step 0" in said[0]
    assert all(torch.equal(params[k], before[k]) for k in params)  # the weights were not half-loaded


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
