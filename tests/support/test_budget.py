"""helpers.support.budget reads the counted T4 budget (helpers/support/t4_budget.json); bench/t4_budget.py
counts it, here at the tiny profile's shapes (the plumbing: the real sizes are tests/bench/test_t4_budget.py's)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.support import budget

ROOT = Path(__file__).parents[2]


def _close(a, b, rel=2e-3):
    """Nested dicts of floats equal to `rel` (the file keeps 4 significant digits)."""
    if isinstance(a, dict):
        return set(a) == set(b) and all(_close(a[k], b[k], rel) for k in a)
    return a == pytest.approx(b, rel=rel)


def test_the_packaged_budget_is_read_once_and_says_how_it_was_counted():
    b = budget.t4_budget()
    assert budget.t4_budget() is b
    assert {"how", "settings", "training", "sampling", "projections", "emulation_check"} <= set(b)
    assert b["how"]["torch"] and b["how"]["date"] and b["how"]["emulated"]
    assert b["emulation_check"]["ops"] > 1000 and b["emulation_check"]["mismatches"] == []
    for variant in ("vanilla", "text_aware"):
        for kind in ("plain", "checkpointing"):
            c = b["training"][variant][kind]
            assert sum(c["parts_gib"].values()) == pytest.approx(c["peak_gib"], rel=2e-3)
    assert budget.training_peak_gib("text_aware") <= b["settings"]["memory_limit_gib"]
    assert budget.training_peak_gib("text_aware", checkpointing=True) < budget.training_peak_gib("text_aware")


def test_minutes_are_the_counted_flops_over_the_named_fraction_of_the_t4s_peak():
    b = budget.t4_budget()
    tflop, steps = b["training"]["text_aware"]["plain"]["tflop"], b["settings"]["steps_per_variant"]
    assert budget.training_minutes("text_aware", efficiency=0.25) == pytest.approx(steps * tflop / (0.25 * 65 * 60))
    assert budget.training_minutes("text_aware", 10, 0.5) == pytest.approx(10 * tflop / (0.5 * 65 * 60))
    s = b["sampling"]
    assert budget.images_minutes(100, 0.12, references=5) == pytest.approx(
        (100 * s["tflop_per_image"] + 5 * s["image_encoder_tflop_per_reference"]) / (0.12 * 65 * 60))
    assert budget.notebook_03_minutes(0.35) == pytest.approx(
        sum(budget.training_minutes(v, efficiency=0.35) for v in ("vanilla", "text_aware", "text_aware")))
    assert budget.efficiency_label(0.12) == "12% of the T4's 65 TFLOPS fp16 peak"
    with pytest.raises(ValueError, match="fraction"):
        budget.minutes(1.0, 25)
    with pytest.raises(KeyError, match="counted are"):
        budget.training_minutes("no_such_variant")


def test_the_files_projections_are_what_the_reader_computes_from_its_counts():
    b = budget.t4_budget()
    assert _close(budget.projections(b), b["projections"])
    assert set(b["projections"]["notebook_05_grid_minutes"]) == {f"{e:g}" for e in budget.EFFICIENCIES}


def test_the_budget_was_counted_at_the_full_profiles_defaults_and_todays_grid():
    """Fails when the profile's defaults or the registry's models change: then run python bench/t4_budget.py."""
    from helpers.evaluate import protocol
    from helpers.evaluate.protocol import grid_size
    from helpers.profile import full_profile
    from helpers.sample.registry import MODEL_NAMES

    full, st = full_profile("test"), budget.t4_budget()["settings"]
    references = (protocol.grid_references(full, 10**6) if hasattr(protocol, "grid_references")
                  else full.eval_num_references)
    counted = {k: st[k] for k in ("resolution", "train_batch_size", "epochs", "scheduler", "inference_steps",
                                  "guidance_scale", "grid_references", "grid_models", "grid_images")}
    now = {"resolution": full.resolution, "train_batch_size": full.train_batch_size, "epochs": full.num_epochs,
           "scheduler": full.scheduler, "inference_steps": full.num_inference_steps,
           "guidance_scale": full.guidance_scale, "grid_references": references, "grid_models": len(MODEL_NAMES),
           "grid_images": grid_size(references * (1 + full.eval_edits_per_reference), len(MODEL_NAMES),
                                    len(full.eval_scales), len(full.eval_seeds))}
    assert counted == now, "helpers/support/t4_budget.json is stale: run python bench/t4_budget.py"
    assert st["steps_per_variant"] == full.num_epochs * math.ceil(st["train_images"] / full.train_batch_size)


def test_batch_sizes_fit_the_counted_sampling_memory():
    per_image, overhead = budget.sampling_memory()
    assert 0 < per_image < 1 and 0 < overhead < 2  # GiB
    assert budget.fits_batch((overhead + 3 * per_image) / 0.7 * 1.0001) == 3
    assert budget.fits_batch((overhead + 3 * per_image) / 0.7 * 0.9999) == 2
    assert budget.fits_batch(0.0) == 1 and budget.fits_batch(1000.0) == 8 and budget.fits_batch(1000.0, most=5) == 5
    assert budget.sampling_memory(256)[0] == pytest.approx(per_image / 4)  # pixels
    assert budget.sampling_memory(guidance=1.0)[0] == pytest.approx(per_image / 2)  # half the UNet's batch


def test_reading_the_budget_imports_no_torch():
    code = ("import sys; from helpers.support import budget; budget.grid_minutes(); budget.training_minutes(); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_benchmark_at_tiny_shapes_writes_a_budget_the_reader_reads(tiny_profile, tmp_path, capsys):
    """bench/t4_budget.py end to end on the tiny models: counts, the emulation check, the file, the report."""
    sys.path.insert(0, str(ROOT / "bench"))
    import t4_budget

    from helpers.model.official_format import adapter_parameters

    out = tmp_path / "budget.json"
    t4_budget.main(["--profile", "tiny", "--output", str(out), "--variants", "text_aware", "--no-checkpointing"])
    b = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "12% of the T4's 65 TFLOPS fp16 peak" in printed
    assert b["settings"]["profile"] == "tiny" and b["emulation_check"]["mismatches"] == []
    c = b["training"]["text_aware"]["plain"]
    assert sum(c["parts_gib"].values()) == pytest.approx(c["peak_gib"], rel=2e-3)
    import _t4_steps

    unet = _t4_steps.profile_pipeline(tiny_profile, "text_aware").unet
    trainable = sum(p.numel() for p in adapter_parameters(unet).values())
    assert c["trainable_parameters"] == trainable
    # AdamW's two fp32 states of every trainable tensor exist at the counted step (each rounded up to 512 B)
    assert 8 * trainable <= c["parts_gib"]["optimizer_state"] * 2**30 <= 8 * trainable + 3 * 512 * len(
        adapter_parameters(unet))
    s = b["sampling"]
    assert s["batch"] == 1 + tiny_profile.eval_edits_per_reference and s["steps"] == tiny_profile.num_inference_steps
    assert s["tflop_per_image"] > s["decode_tflop_per_image"] > 0
    assert _close(budget.projections(b), b["projections"])
    assert budget.training_minutes("text_aware", efficiency=0.25, budget=b) > 0
    assert b["projections"]["notebook_03_minutes"] == {}  # vanilla was not counted


def test_readme_quotes_the_counted_budget_as_it_is():
    """README's figures come from the file: its budget block is summary_lines() word for word."""
    from pathlib import Path

    from helpers.support.budget import summary_lines

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "```text\n" + "\n".join(summary_lines()) + "\n```" in readme, \
        "README's 'What it costs on a T4' block is stale: paste summary_lines() again (README says how)"
