"""bench/gpu_check.py (./run.sh gpu-check) without a GPU: it says so plainly, and its CPU self-test (--tiny)
runs every part (the segmenter through helpers.data.masks's own code) on the tiny models and writes its JSON
and the block to paste; with_counts turns measured times into helpers.support.budget_measured's lines. Which
wheels it installs: never torch and its kin, never a package the machine has at that version or newer."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
import _t4_steps  # noqa: E402
import gpu_check  # noqa: E402

from helpers.profile import tiny_profile  # noqa: E402
from helpers.support import budget_counts as counts  # noqa: E402
from helpers.support import budget_measured as measured  # noqa: E402


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_without_a_gpu_it_says_so_and_writes_nothing():
    before = gpu_check.RESULTS.stat().st_mtime_ns if gpu_check.RESULTS.exists() else None
    r = _run()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "NO GPU" in r.stdout and "--tiny" in r.stdout
    assert (gpu_check.RESULTS.stat().st_mtime_ns if gpu_check.RESULTS.exists() else None) == before


@pytest.fixture(scope="module")
def self_test(tmp_path_factory):
    """The CPU self-test run once: (its stdout, the JSON it wrote)."""
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    r = _run("--tiny", "--steps", "2", "--calls", "2", "--output", str(out),
             env={"IPA_PROFILE": "tiny", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(out.read_text())


def test_the_cpu_self_test_runs_every_part_and_writes_its_json(self_test):
    stdout, result = self_test
    assert "NO GPU" in stdout and "no figure below is a GPU measurement" in stdout
    assert result["self_test"] is True and result["machine"]["gpu"] is None and result["profile"] == "tiny"
    assert result["machine"]["torch"] == torch.__version__ and result["date"]
    for variant in ("vanilla", "text_aware"):
        m = result["training"][variant]
        assert m["steps"] == 2 and m["median_s_per_step"] > 0
        assert "fraction_of_peak" not in m and "counted_peak_gib" not in m  # tiny models sit beside no count
    assert result["feature_cache"]["images"] == 8 and result["feature_cache"]["images_per_s"] > 0
    assert result["sampling"]["s_per_image"] > 0
    assert result["sampling"]["steps"] == tiny_profile("test").num_inference_steps
    g = result["segmenter"]
    assert g["batch"] == counts.t4_budget()["segmenter"]["batch"] and g["calls"] == g["model_calls"] == 2
    assert g["s_per_call"] > 0 and g["model_s_per_call"] > 0 and g["model_text_positions"] == 77
    assert "t4_line" not in g


def test_the_block_to_paste_is_printed_and_read_back_from_the_json(self_test):
    """The block at the end of the output is the JSON's "lines", and check_lines makes it again from the file."""
    stdout, result = self_test
    block = stdout.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert block == result["lines"] == gpu_check.check_lines(result)
    assert block[0].startswith(f"GPU check ({result['date']}) on the CPU") and torch.__version__ in block[0]
    assert any(line.lstrip().startswith("segmenter ") for line in block)
    assert block[-1].startswith("  NOT A GPU MEASUREMENT")


@pytest.mark.parametrize("gpu_name, t4", [("NVIDIA H100 80GB HBM3", False), ("Tesla T4", True)])
def test_on_a_gpu_each_time_goes_through_the_budgets_own_lines(self_test, gpu_name, t4):
    """The self-test's measured times as a GPU run's: with_counts turns each into the fraction of the T4's
    peak by helpers.support.budget_measured's functions, with their lines; a card that is not a T4 is called so."""
    result = json.loads(json.dumps(self_test[1]))
    result.update(self_test=False, profile="full", train_batch_size=4)
    peak = _common.fp16_peak_tflops(gpu_name)
    result["machine"]["gpu"] = {"name": gpu_name, "capability": "9.0", "total_gib": 79.2, "fp16_peak_tflops": peak}
    result["t4_emulation"] = {"memory_cap_gib": 15.0}
    for m in (*result["training"].values(), result["feature_cache"], result["sampling"], result["segmenter"]):
        m.update(peak_allocated_gib=1.0, peak_reserved_gib=1.5)
    result = json.loads(json.dumps(gpu_check.with_counts(result, result["machine"], self_test=False)))
    t = result["training"]["vanilla"]["median_s_per_step"]
    assert result["training"]["vanilla"]["fraction_of_t4_peak"] == measured.training_step_efficiency(t, "vanilla")
    assert result["training"]["vanilla"]["fraction_of_peak"] == pytest.approx(
        measured.training_step_efficiency(t, "vanilla", peak_tflops=peak))
    assert result["training"]["vanilla"]["t4_line"] == measured.training_speed_line(t, "vanilla", batch_size=4)
    assert result["training"]["vanilla"]["counted_peak_gib"] == counts.training_peak_gib("vanilla")
    s = result["sampling"]
    assert s["t4_line"] == measured.sampling_speed_line(s["s_per_image"], steps=s["steps"])
    c = result["feature_cache"]
    assert c["t4_line"] == measured.feature_cache_speed_line(c["batch"] / c["images_per_s"], c["batch"])
    assert c["fraction_of_t4_peak"] == pytest.approx(measured.implied_efficiency(1 / c["images_per_s"],
                                                                                 counts.feature_cache_tflop()))
    g = result["segmenter"]
    assert g["t4_line"] == measured.segmenter_speed_line(g["model_s_per_call"], g["batch"])
    assert g["masks_t4_line"] == measured.segmenter_speed_line(g["s_per_call"], g["batch"])
    assert g["counted_peak_gib"] == counts.t4_budget()["segmenter"]["peak_gib"]
    lines = gpu_check.check_lines(result)
    assert f"    {g['t4_line']}; {g['fraction_of_peak']:.1%} of this GPU's own fp16 peak" in lines
    assert any(f"(counted {g['counted_peak_gib']:.2f})" in line for line in lines)
    assert lines[0].startswith(f"GPU check ({result['date']}) on {gpu_name} (79.2 GiB")
    assert lines[-1].startswith("  On a T4" if t4 else f"  NOT A T4: {gpu_name}, its memory capped")
    assert "65 TFLOPS" in lines[-1] or t4


def test_the_segmenter_runs_through_helpers_data_masks(monkeypatch):
    """measure_segmenter times helpers.data.masks.segment_probabilities itself (Segmenter.logits on each call's
    drawings and their mask prompts), then the model call alone at the counted 77 text positions."""
    from transformers import CLIPSegForImageSegmentation

    from helpers.data import masks
    from helpers.tiny.cartoons import CHARACTERS, POSES, SCENES, cartoon_caption

    profile = tiny_profile("test")
    calls, inputs, whole = [], [], []
    probabilities = masks.segment_probabilities
    monkeypatch.setattr(masks, "segment_probabilities", lambda *a, **kw: (whole.append(kw["batch_size"]),
                                                                         probabilities(*a, **kw))[1])
    logits = masks.Segmenter.logits
    monkeypatch.setattr(masks.Segmenter, "logits", lambda self, images, prompts: (
        calls.append(([im.size for im in images], list(prompts))), logits(self, images, prompts))[1])
    forward = CLIPSegForImageSegmentation.forward
    monkeypatch.setattr(CLIPSegForImageSegmentation, "forward", lambda self, **kw: (
        inputs.append({k: tuple(v.shape) for k, v in kw.items() if torch.is_tensor(v)}), forward(self, **kw))[1])
    m = gpu_check.measure_segmenter(profile, torch.device("cpu"), torch.float32, batch=4, calls=3, seconds=60)
    assert whole == [4] * 4 and len(calls) == 1 + m["calls"] == 4  # a warm-up, then the timed calls
    assert len(inputs) == len(calls) + 1 + m["model_calls"]
    size, side = _t4_steps.segmenter_size(profile), profile.resolution
    captions = [cartoon_caption(i % len(CHARACTERS), POSES[i % len(POSES)], i % len(SCENES)) for i in range(4)]
    assert calls == [([(side, side)] * 4, [masks.mask_prompt(c) for c in captions])] * 4
    assert inputs[0]["pixel_values"] == (4, 3, size, size) and inputs[0]["input_ids"] == (4, m["prompt_positions"])
    assert inputs[-1]["input_ids"] == (4, 77) == inputs[-1]["attention_mask"]


def test_on_a_gpu_the_segmenter_is_the_published_clipseg_at_the_counted_batch(tmp_path):
    """The full profile's segmenter as the GPU run builds it (on the meta device here): CIDAS/clipseg-rd64-refined's
    published config (the budget's parameter count), its processor at 352 px, the tokenizer's 77 positions; the
    counted batch is helpers.data.masks's."""
    import inspect

    from helpers.data.masks import segment
    from helpers.profile import full_profile

    counted = counts.t4_budget()["segmenter"]
    seg = gpu_check.check_segmenter(full_profile("test"), device="meta", folder=tmp_path)
    assert seg.name == counted["model"] == "CIDAS/clipseg-rd64-refined"
    assert sum(p.numel() for p in seg.model.parameters()) == counted["parameters"]
    assert seg.processor.image_processor.size in (counted["image_size"], {"height": 352, "width": 352})
    assert seg.processor.tokenizer.model_max_length == counted["text_positions"] == 77
    assert inspect.signature(segment).parameters["batch_size"].default == counted["batch"]


def test_a_run_past_its_time_box_skips_the_parts_left_and_says_so(tmp_path):
    out = tmp_path / "check.json"
    r = _run("--tiny", "--run-seconds", "0", "--output", str(out), env={"IPA_PROFILE": "tiny"})
    assert r.returncode == 1, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert all("skipped" in result[k] for k in ("segmenter", "feature_cache", "sampling"))
    assert "SKIPPED" in r.stdout and "NOT MEASURED: segmenter, training vanilla" in r.stdout
    assert gpu_check.check_lines(result)[1] == "  segmenter: SKIPPED (the run's time box of 0 s was spent)"


def test_only_missing_or_older_packages_are_installed_and_never_torch(tmp_path):
    here = importlib.metadata.version("transformers")
    for name in ("torch-999.0-cp312-cp312-manylinux_2_28_x86_64.whl", "triton-999.0-cp312-cp312-linux_x86_64.whl",
                 "nvidia_cublas-999.0-py3-none-manylinux_2_27_x86_64.whl", "torchvision-999.0-cp312-cp312-linux.whl",
                 f"transformers-{here}-py3-none-any.whl", "no_such_package_here-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    # torch and its kin newer than the machine's, and a missing package: only the missing one
    assert [w.name for w in gpu_check.wheels_to_install(tmp_path)] == ["no_such_package_here-1.0-py3-none-any.whl"]
    (tmp_path / "transformers-999.0-py3-none-any.whl").write_bytes(b"")  # newer than the machine's: installed
    assert "transformers-999.0-py3-none-any.whl" in [w.name for w in gpu_check.wheels_to_install(tmp_path)]


def test_a_missing_package_without_wheels_is_named(monkeypatch):
    assert gpu_check.install_missing(None) == []  # everything is here
    monkeypatch.setattr(gpu_check, "NEEDED", (*gpu_check.NEEDED, "no_such_module_here"))
    with pytest.raises(SystemExit, match="no_such_module_here.*--wheels"):
        gpu_check.install_missing(None)


def test_each_gpu_in_the_peak_table_is_read_as_itself():
    """The longest name wins: an L40S is not read as an L4, nor an H100 PCIe as an H100 SXM."""
    for name, tflops in _common._FP16_TFLOPS.items():
        assert _common.fp16_peak_tflops(f"NVIDIA {name}") == tflops, name
    assert _common.fp16_peak_tflops("NVIDIA GeForce RTX 4090") is None
