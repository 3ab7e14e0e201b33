"""helpers.train.launch: notebook 03 trains on every GPU through `accelerate launch -m helpers.train` as a
subprocess, with the recipe's global batch split over the processes; on one GPU or none it trains in-process.
Two CPU processes (gloo) stand in for two GPUs."""
import dataclasses
import io
import json
import subprocess
import sys

import pytest

import helpers.train.launch as launch_module
from helpers.model.adapter_file import ADAPTER_FILE
from helpers.train.config import TrainConfig, config_args
from helpers.train.errors import TrainingError
from helpers.train.launch import launch_command, train_on_all_gpus
from helpers.train.loop import TrainResult, train
from helpers.train.loss_log import read_loss_log


def tiny_config(profile, tmp_path, **kw):
    return TrainConfig.from_profile(profile, output_dir=tmp_path / "run", variant="vanilla", **kw)


def test_one_gpu_or_none_trains_in_this_process_as_before(tiny_profile, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch_module, "train", lambda config: calls.append(("here", config)) or "result")
    monkeypatch.setattr(launch_module, "launch", lambda config, n, **kw: calls.append(("launch", n)))
    config = tiny_config(tiny_profile, tmp_path)
    assert train_on_all_gpus(config, gpus=1) == "result" and train_on_all_gpus(config, gpus=0) == "result"
    monkeypatch.setattr(launch_module, "gpu_count", lambda: 0)  # this machine: no CUDA
    train_on_all_gpus(config)
    assert calls == [("here", config)] * 3
    train_on_all_gpus(config, gpus=2)
    assert calls[-1] == ("launch", 2)


def test_the_command_is_accelerate_launch_with_one_process_per_gpu_and_the_configs_flags(tiny_profile, tmp_path):
    config = tiny_config(tiny_profile, tmp_path, seed=3)
    cmd = launch_command(config, 2, port=29999, result_file=tmp_path / "r.json")
    assert cmd[:7] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines"]
    assert cmd[cmd.index("--main_process_port") + 1] == "29999" and cmd[cmd.index("--mixed_precision") + 1] == "no"
    i = cmd.index("helpers.train")
    assert cmd[i - 1] == "-m" and cmd[i + 1:] == config_args(config) + ["--result-file", str(tmp_path / "r.json")]


def test_a_process_count_that_does_not_divide_the_global_batch_is_refused_before_anything_starts(
        tiny_profile, tmp_path, monkeypatch):
    def no_process(*a, **kw):
        raise AssertionError("nothing may start")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    config = tiny_config(tiny_profile, tmp_path)  # the tiny profile's global batch: 4
    with pytest.raises(TrainingError, match=r"the global batch of 4 does not split over 3 processes \(GPUs\)"):
        train_on_all_gpus(config, gpus=3)
    with pytest.raises(TrainingError, match="of 6 does not split over 4 processes.*use 1 or 2 or 3 processes"):
        launch_command(dataclasses.replace(config, batch_size=6), 4)
    assert launch_command(dataclasses.replace(config, scale_batch_with_gpus=True), 3)  # 4 on each: 12 in all


def test_profile_settings_the_command_line_cannot_carry_are_refused(tiny_profile, tmp_path):
    config = tiny_config(tiny_profile.replace(feature_batch_size=3, learning_rate=5e-5), tmp_path)
    with pytest.raises(TrainingError, match=r"would not travel: feature_batch_size 3 here, 16 there\. Set them"):
        launch_command(config, 2)
    assert "--learning-rate" in launch_command(tiny_config(tiny_profile.replace(learning_rate=5e-5), tmp_path), 2)
    masked = tiny_config(tiny_profile.replace(mask_background_weight=0.3), tmp_path)  # a masked run's b
    with pytest.raises(TrainingError, match=r"would not travel: mask_background_weight 0.3 here, 0.1 there"):
        launch_command(masked, 2)


def fake_launch(monkeypatch, script: str):
    """From now on launch() runs `python -c script` instead of accelerate launch."""
    monkeypatch.setattr(launch_module, "launch_command",
                        lambda config, n, **kw: [sys.executable, "-c", script, "accelerate", "launch", "x", "y"])


def test_a_launch_that_stops_raises_the_run_s_own_error_and_streams_its_output(tiny_profile, tmp_path, monkeypatch):
    fake_launch(monkeypatch, "import sys; print('train vanilla: 50%\\r', end=''); "
                             "sys.exit('error: no room for /runs/vanilla/checkpoints/ckpt-000004: free some space')")
    out = io.StringIO()
    with pytest.raises(TrainingError) as stop:
        launch_module.launch(tiny_config(tiny_profile, tmp_path), 2, out=out)
    assert str(stop.value) == ("no room for /runs/vanilla/checkpoints/ckpt-000004: free some space "
                               "(training on 2 processes)")
    assert "train vanilla: 50%\r" in out.getvalue()  # the progress bar's carriage return reaches the cell
    fake_launch(monkeypatch, "import sys; print('Traceback (most recent call last):'); print('Segfault'); sys.exit(3)")
    with pytest.raises(TrainingError, match=r"stopped \(exit status 3\) without a result\. Its last lines:\n"
                                            r"Traceback \(most recent call last\):\nSegfault\n"):
        launch_module.launch(tiny_config(tiny_profile, tmp_path), 2, out=io.StringIO())


def test_training_on_two_processes_as_03_starts_it_writes_one_adapter_with_the_global_batch(
        tiny_profile, tmp_path, monkeypatch):
    """Fresh output root: the launched run prepares data, cache, masks and masked features itself (a masked run,
    MASK both: the main process makes them once, the other reads them); two CPU processes (gloo) train
    data-parallel, the main process alone writes; the global batch is the recipe's 4, 2 per process. A resume
    with another number of processes is refused, naming both."""
    monkeypatch.setenv("IPA_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_config(tiny_profile, tmp_path, max_steps=2, checkpoint_every=2, mask="both")
    out = io.StringIO()
    result = train_on_all_gpus(config, gpus=2, out=out)
    printed = out.getvalue()
    assert "Training on 2 processes: accelerate launch --multi_gpu --num_processes 2" in printed
    assert isinstance(result, TrainResult) and (result.steps, result.resumed_from) == (2, 0)
    assert result.adapter == tmp_path / "run" / ADAPTER_FILE and result.adapter.is_file()
    assert f"Wrote {result.adapter} after 2 steps" in printed and printed.count("Wrote ") == 1
    data = tmp_path / "outputs" / "data"
    assert all((data / f).is_file() for f in ("train_features.safetensors", "masks.safetensors",
                                              "train_features_masked.safetensors"))
    assert printed.count("MASK = 'both', an opt-in run") == 1 and printed.count("Making every drawing's mask") == 1
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (settings["global_batch_size"], settings["per_process_batch_size"], settings["num_processes"],
            settings["batch_size"]) == (4, 2, 2, 4)
    assert settings["learning_rate"] == tiny_profile.learning_rate and settings["mask"] == "both"
    assert len(read_loss_log(tmp_path / "run")) == 2 == len(result.losses)  # one row a step, one writer
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [ADAPTER_FILE, "checkpoints", "config.json", "loss_log.csv"])  # no stray files, no lock left
    with pytest.raises(TrainingError, match=r"ckpt-000002 was written with other settings than this run's: number of "
                                            r"processes \(GPUs.*\) 2 there, 1 now"):
        train(dataclasses.replace(config, max_steps=3), progress=False)
