"""helpers.train.run: a run uses the Profile its TrainConfig carries (no second lookup by name), and records the
same settings as the notebook's earlier field-by-field copy did, so runs written that way still resume."""
import dataclasses
import json
import sys

import pytest

from helpers.profile import get_profile
from helpers.train.config import TrainConfig, read_run_settings
from helpers.train.loop import train
from helpers.train.run import prepare_run, release


def refuse_lookups(monkeypatch):
    """Every get_profile helpers has imported raises from now on."""
    def lookup(*args, **kw):
        raise AssertionError(f"get_profile{args} called: the run must use the Profile it was given")

    for name, module in list(sys.modules.items()):
        if name.startswith("helpers") and hasattr(module, "get_profile"):
            monkeypatch.setattr(module, "get_profile", lookup)


def test_a_run_uses_the_profile_it_was_given_with_its_overrides(tiny_data, tmp_path, monkeypatch):
    _, _, data_dir = tiny_data
    profile = get_profile("tiny", announce=False, learning_rate=3e-4, train_batch_size=2, checkpoint_every=3,
                          max_train_steps=5)
    config = TrainConfig.from_profile(profile, output_dir=tmp_path / "run", variant="vanilla",
                                      data_dir=str(data_dir), seed=7, weight_decay=0.05)
    refuse_lookups(monkeypatch)
    run = prepare_run(config, progress=False)
    try:
        assert run.profile is profile
        s = run.settings
        assert (s["learning_rate"], s["batch_size"], s["checkpoint_every"], s["max_steps"]) == (3e-4, 2, 3, 5)
        assert (s["seed"], s["weight_decay"], s["variant"], s["profile"]) == (7, 0.05, "vanilla", "tiny")
        assert json.loads(json.dumps(s)) == s  # config.json and the adapter's metadata hold it as it is
    finally:
        release(run)


def test_settings_are_the_old_copy_s_and_a_run_it_wrote_resumes(tiny_data, tmp_path):
    """Notebook 03 copied the profile's values into TrainConfig and named the profile; a run it wrote must
    resume under TrainConfig.from_profile, with the same config.json but for the longer run."""
    _, _, data_dir = tiny_data
    profile = get_profile("tiny", announce=False, max_train_steps=2, checkpoint_every=1, learning_rate=2e-4)
    out = tmp_path / "run"
    old = TrainConfig(output_dir=str(out), variant="text_aware", profile=profile.name, data_dir=str(data_dir),
                      batch_size=profile.train_batch_size, epochs=profile.num_epochs,
                      max_steps=profile.max_train_steps, learning_rate=profile.learning_rate,
                      checkpoint_every=profile.checkpoint_every, seed=0,
                      gradient_checkpointing=profile.gradient_checkpointing, fresh_start=False, pairing="self",
                      pairing_self_prob=0.25)
    assert train(old, progress=False).steps == 2
    before = read_run_settings(out)
    longer = profile.replace(max_train_steps=3)
    new = TrainConfig.from_profile(longer, output_dir=out, variant="text_aware", data_dir=str(data_dir), seed=0,
                                   fresh_start=False, pairing="self", pairing_self_prob=0.25)
    result = train(new, progress=False)
    assert (result.resumed_from, result.steps) == (2, 3)
    after = read_run_settings(out)
    assert after.pop("max_steps") == 3 and before.pop("max_steps") == 2
    assert after == before


def test_a_checkpoint_written_before_the_global_batch_resumes_and_a_changed_batch_is_still_refused(tiny_data, tmp_path):
    """Checkpoints written before issue 28 record batch_size per process and no global_batch_size: a
    single-process run of batch 4 continues; one of batch 2 (global 2) does not, under a global batch of 4."""
    from helpers.train.checkpoints import MANIFEST, list_checkpoints
    from helpers.train.run import TrainingError

    _, _, data_dir = tiny_data
    profile = get_profile("tiny", announce=False, max_train_steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    config = TrainConfig.from_profile(profile, output_dir=out, variant="text_aware", data_dir=str(data_dir))
    assert train(config, progress=False).steps == 2

    def write_old_settings(batch_size):  # the newest checkpoint's, the one a resume reads
        folder = list_checkpoints(out)[-1][1]
        manifest = json.loads((folder / MANIFEST).read_text())
        settings = manifest["settings"]
        assert settings.pop("global_batch_size") == 4 and settings["num_processes"] == 1
        manifest["settings"] = {**settings, "batch_size": batch_size}
        (folder / MANIFEST).write_text(json.dumps(manifest))

    write_old_settings(4)
    longer = TrainConfig.from_profile(profile.replace(max_train_steps=3), output_dir=out, variant="text_aware",
                                      data_dir=str(data_dir))
    result = train(longer, progress=False)
    assert (result.resumed_from, result.steps) == (2, 3)
    write_old_settings(2)  # the checkpoint at step 3, as an older run of batch 2 would have left it
    with pytest.raises(TrainingError, match=r"ckpt-000003 was written with other settings than this run's: global "
                                            r"batch size \(all processes together\) 2 there, 4 now\."):
        train(dataclasses.replace(longer, max_steps=4), progress=False)
