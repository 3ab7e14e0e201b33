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
