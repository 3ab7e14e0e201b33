"""bench/gpu_check.py (./run.sh gpu-check) without a GPU: it says so plainly, and its CPU self-test (--tiny)
runs every part on the tiny models and writes its JSON. Which wheels it installs: never torch and its kin,
never a package the machine has at that version or newer."""

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
import gpu_check  # noqa: E402

from helpers.profile import tiny_profile  # noqa: E402


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


def test_the_cpu_self_test_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "check.json"
    r = _run("--tiny", "--steps", "2", "--output", str(out), env={"IPA_PROFILE": "tiny", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NO GPU" in r.stdout and "no figure below is a GPU measurement" in r.stdout
    result = json.loads(out.read_text())
    assert result["self_test"] is True and result["machine"]["gpu"] is None and result["profile"] == "tiny"
    assert result["machine"]["torch"] == torch.__version__
    for variant in ("vanilla", "text_aware"):
        m = result["training"][variant]
        assert m["steps"] == 2 and m["median_s_per_step"] > 0
        assert "fraction_of_peak" not in m and "counted_peak_gib" not in m  # tiny models sit beside no count
    assert result["feature_cache"]["images"] == 8 and result["feature_cache"]["images_per_s"] > 0
    assert result["sampling"]["s_per_image"] > 0
    assert result["sampling"]["steps"] == tiny_profile("test").num_inference_steps


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
