"""helpers.train.config: a run's settings are the Profile it is given and its own values on it."""
import pytest

import helpers.train.config as config_module
from helpers.profile import get_profile
from helpers.train.config import TrainConfig, parse_config, recipe, run_profile


@pytest.fixture(scope="module")
def tuned(tiny_profile):
    """The tiny profile with a notebook's overrides (get_profile's keyword overrides)."""
    return get_profile("tiny", announce=False, learning_rate=3e-4, train_batch_size=2, checkpoint_every=3)


def test_from_profile_keeps_the_profile_and_the_run_s_own_values(tuned, tmp_path):
    config = TrainConfig.from_profile(tuned, output_dir=tmp_path / "run", variant="vanilla", weight_decay=0.05,
                                      seed=None, pairing="mirror", fresh_start=True)
    assert config.profile is tuned and run_profile(config) is tuned
    assert config.output_dir == str(tmp_path / "run") and config.variant == "vanilla"
    assert config.seed == 0 and config.pairing == "mirror" and config.fresh_start  # None keeps the default
    r = recipe(config, run_profile(config))
    assert (r["learning_rate"], r["batch_size"], r["checkpoint_every"], r["weight_decay"]) == (3e-4, 2, 3, 0.05)
    assert recipe(TrainConfig.from_profile(tuned, tmp_path, batch_size=1), tuned)["batch_size"] == 1  # run's own wins
    assert config.values()["profile"] == "tiny" and config.values()["pairing"] == "mirror"


def test_from_profile_refuses_a_name_and_a_field_it_does_not_have(tuned, tmp_path):
    with pytest.raises(TypeError, match="takes a helpers.profile.Profile, not 'tiny'"):
        TrainConfig.from_profile("tiny", tmp_path)
    with pytest.raises(TypeError, match="TrainConfig has no field batch, lr; the fields are .*batch_size"):
        TrainConfig.from_profile(tuned, tmp_path, batch=2, lr=1e-3)


def test_the_command_line_resolves_the_profile_once_and_builds_the_config_on_it(tmp_path, monkeypatch):
    calls, real = [], get_profile

    def counted(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(config_module, "get_profile", counted)
    config = parse_config(["--profile", "tiny", "--output-dir", str(tmp_path), "--batch-size", "2", "--seed", "3"])
    assert len(calls) == 1 and config.profile.name == "tiny" and config.profile.random_weights
    assert (config.batch_size, config.seed, config.learning_rate) == (2, 3, None)
    assert run_profile(config) is config.profile and len(calls) == 1  # the run uses it: no second lookup


def test_a_profile_that_cannot_be_used_is_a_usage_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IPA_RESOLUTION", "100")
    with pytest.raises(SystemExit) as stop:
        parse_config(["--profile", "tiny", "--output-dir", str(tmp_path)])
    assert stop.value.code == 2 and "error: $IPA_RESOLUTION='100': give a size in pixels, a multiple of 64" \
        in capsys.readouterr().err


def test_mask_is_one_of_its_four_values_on_the_command_line(tmp_path, capsys):
    base = ["--profile", "tiny", "--output-dir", str(tmp_path)]
    assert parse_config(base).mask == "none"
    assert parse_config(base + ["--mask", "loss"]).mask == "loss"
    with pytest.raises(SystemExit) as stop:
        parse_config(base + ["--mask", "background"])
    assert stop.value.code == 2 and "--mask: invalid choice: 'background'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["profile defaults", "notebook overrides", "own values", "quick run", "epochs"])
def test_the_command_line_carries_a_config_whole(case, tmp_path):
    """config_args -> parse_config gives the same run (resolved: every recipe value written out), with the
    same batch, learning rate and length as the config it came from, whatever the profile's overrides."""
    tiny = get_profile("tiny", announce=False)
    profile, own = {
        "profile defaults": (tiny, {}),
        "notebook overrides": (tiny.replace(train_batch_size=2, learning_rate=3e-4, checkpoint_every=3,
                                            gradient_checkpointing=True, max_train_steps=5), {}),
        "own values": (tiny, dict(batch_size=8, learning_rate=2.5e-5, weight_decay=0.0, max_steps=7, seed=3,
                                  pairing="neighbour", pairing_self_prob=0.5, mask="both", fresh_start=True, keep_checkpoints=1,
                                  max_grad_norm=0.5, mixed_precision="no", scale_batch_with_gpus=True,
                                  dataset="somewhere", resolution=64, test_fraction=0.25)),
        "quick run": (get_profile("tiny", announce=False, quick=True), {}),
        "epochs": (tiny, dict(epochs=2)),  # epochs given: the profile's max_train_steps no longer decides
    }[case]
    config = TrainConfig.from_profile(profile, output_dir=tmp_path / "run", variant="vanilla",
                                      data_dir=str(tmp_path / "data"), **own)
    args = config_module.config_args(config)
    back = parse_config(args)
    assert back.values() == config_module.resolved(config).values()
    assert config_module.config_args(back) == args
    assert args[args.index("--mask") + 1] == config.mask == back.mask  # "none" unless given
    assert recipe(back, back.profile) == recipe(config, profile)
    for steps_per_epoch in (1, 3, 50):
        assert (config_module.max_steps(back, back.profile, steps_per_epoch)
                == config_module.max_steps(config, profile, steps_per_epoch))


def test_the_global_batch_splits_over_the_processes_or_is_refused():
    plan = config_module.batch_plan(4, 1e-4, 2)
    assert plan == {"global_batch_size": 4, "per_process_batch_size": 2, "num_processes": 2, "learning_rate": 1e-4,
                    "learning_rate_rule": "0.0001, the recipe's for a batch of 4"}
    assert config_module.batch_plan(4, 1e-4, 1)["per_process_batch_size"] == 4  # one T4: as before
    with pytest.raises(ValueError, match=r"the global batch of 4 does not split over 3 processes .* use 1 or 2 "
                                         r"processes, or .*--scale-batch-with-gpus"):
        config_module.batch_plan(4, 1e-4, 3)
    scaled = config_module.batch_plan(4, 1e-4, 2, scale_with_gpus=True)  # linear scaling: lr x global / batch
    assert (scaled["global_batch_size"], scaled["per_process_batch_size"]) == (8, 4)
    assert scaled["learning_rate"] == pytest.approx(2e-4)
    assert scaled["learning_rate_rule"] == "0.0002 = 0.0001 x 8 / 4 (linear scaling with the global batch)"
    assert config_module.batch_plan(4, 1e-4, 3, scale_with_gpus=True)["global_batch_size"] == 12


def test_older_checkpoints_settings_read_in_todays_terms():
    """Before the global batch, batch_size was per process: an old record's global batch is batch x processes.
    Before masks, every run was unmasked: an old record without a mask has mask "none"."""
    old = {"variant": "text_aware", "batch_size": 4, "learning_rate": 1e-4, "num_processes": 1}
    assert config_module.comparable_settings(old)["global_batch_size"] == 4
    assert config_module.comparable_settings({**old, "batch_size": 2, "num_processes": 2})["global_batch_size"] == 4
    assert config_module.comparable_settings({"batch_size": 3, "num_processes": None})["global_batch_size"] == 3
    new = {**old, "global_batch_size": 4, "batch_size": 4, "num_processes": 2, "mask": "loss"}
    assert config_module.comparable_settings(new) is new
    assert config_module.comparable_settings(old)["mask"] == "none"
    assert {"global_batch_size", "num_processes", "learning_rate", "mask"} <= set(config_module.RESUME_SETTINGS)
