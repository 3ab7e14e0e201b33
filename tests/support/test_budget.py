"""helpers.support.budget projects each notebook's minutes from the counted T4 budget (helpers/support/t4_budget.json,
read by budget_counts); bench/t4_budget.py counts it, here at the tiny profile's shapes (the plumbing: the real
sizes are tests/bench/test_t4_budget.py's)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.support import budget
from helpers.support import budget_counts as counts
from helpers.support import budget_measured as measured

ROOT = Path(__file__).parents[2]


def _close(a, b, rel=2e-3):
    """Nested dicts of floats equal to `rel` (the file keeps 4 significant digits)."""
    if isinstance(a, dict):
        return set(a) == set(b) and all(_close(a[k], b[k], rel) for k in a)
    return a == pytest.approx(b, rel=rel)


def test_each_notebooks_minutes_add_up_its_gpu_work():
    b = counts.t4_budget()
    st, s = b["settings"], b["sampling"]
    three = budget.notebook_projection("03")
    runs = counts.training_minutes("vanilla") + counts.training_minutes("text_aware")
    assert three.minutes == pytest.approx(runs + counts.images_minutes(3 + budget.CARD_GRID_IMAGES))
    assert budget.notebook_minutes(3, neighbour=True) == pytest.approx(
        three.minutes + counts.training_minutes("text_aware") + counts.images_minutes(1))
    assert budget.notebook_minutes("03", steps=10) < three.minutes
    # 05: the grid, CLIPSeg on each of its images (the subject scores), the timing images
    five, seg = budget.notebook_projection("05"), b["segmenter"]["tflop_per_image"]
    assert five.minutes == pytest.approx(counts.images_minutes(st["grid_images"] + 2, references=st["grid_references"])
                                         + counts.minutes(st["grid_images"] * seg, 0.12))
    assert budget.grid_minutes() == pytest.approx(counts.images_minutes(
        st["grid_images"], references=st["grid_references"], segmented=True)) == pytest.approx(five.minutes - dict(
            five.parts)["2 timing images"])
    assert budget.notebook_minutes("05", grid_images=100, references=4) == pytest.approx(
        counts.images_minutes(102, references=4) + counts.minutes(100 * seg, 0.12))
    assert counts.seconds_per_image(segmented=True) == pytest.approx(counts.seconds_per_image() + seg / (0.12 * 65))
    # 01: the feature cache of the training split, and CLIPSeg's mask of every row, train and test
    assert st["dataset_rows"] > st["train_images"]
    assert budget.notebook_minutes("01") == pytest.approx(counts.minutes(
        st["train_images"] * (counts.VAE_ENCODE_TFLOP + s["image_encoder_tflop_per_reference"] / 2)
        + st["dataset_rows"] * seg, 0.12))
    assert budget.notebook_minutes("04", inference_steps=15) < budget.notebook_minutes("04")
    series = budget.series_projection()
    assert series.minutes == pytest.approx(sum(budget.notebook_minutes(n) for n in budget.NOTEBOOKS))
    for p in [budget.notebook_projection(n) for n in budget.NOTEBOOKS] + [series]:
        assert 0 < p.best < p.minutes and p.minutes == pytest.approx(sum(m for _, m in p.parts))
        assert f"about {budget._m(p.minutes)} min" in p.line() and p.assumption in p.line()
    assert "8% (training) and 12% (sampling) of the T4's 65 TFLOPS fp16 peak" in series.assumption
    with pytest.raises(ValueError, match="choose one of 01, 02, 03, 04, 05"):
        budget.notebook_projection("06")


def test_a_masked_reference_adds_one_image_encoder_pass_to_notebook_03_and_the_masked_loss_nothing():
    """Issue 27 part 2: MASK "reference" (and "both") encodes the training images again with their background
    filled: one image-encoder pass (the file's figure per reference is two: the image and a zero image), once
    for every run of 03; "loss" weights an elementwise MSE. The default, "none", is 03 as it was."""
    b = counts.t4_budget()
    st, enc = b["settings"], b["sampling"]["image_encoder_tflop_per_reference"]
    none = budget.notebook_projection("03")
    assert budget.notebook_minutes("03", mask="none") == none.minutes
    assert budget.notebook_minutes("03", mask="loss") == pytest.approx(none.minutes)
    pass_ = counts.minutes(st["train_images"] * enc / 2, 0.12)
    assert budget.masked_reference_minutes() == pytest.approx(pass_) and 0 < pass_ < 1
    for mask in ("reference", "both"):
        masked = budget.notebook_projection("03", mask=mask)
        assert masked.minutes == pytest.approx(none.minutes + pass_)
        assert f"mask {mask}) x {st['steps_per_variant']} steps" in masked.line()
        assert "background filled" in masked.parts[0][0]
    # one pass for every run: the neighbour-paired run's references are training images too
    assert budget.notebook_minutes("03", mask="both", neighbour=True) == pytest.approx(
        budget.notebook_minutes("03", neighbour=True) + pass_)
    with pytest.raises(ValueError, match="choose one of none, reference, loss, both"):
        budget.notebook_projection("03", mask="background")


def test_on_two_t4s_training_splits_and_pays_the_gradient_all_reduce_the_grid_and_cache_split_cleanly():
    """Issue 28: each GPU does 1/N of a training step's FLOPs (the global batch is kept), then all-reduces the
    fp32 gradients of the trainable parameters, 2(N-1)/N of their bytes at ALLREDUCE_GB_PER_S; the feature
    cache and 05's grid split by job with nothing to exchange; 02, 04 and 03's samples stay on one GPU."""
    b = counts.t4_budget()
    st, trainable = b["settings"], b["training"]["text_aware"]["plain"]["trainable_parameters"]
    assert counts.gradient_mb("text_aware") == pytest.approx(4 * trainable / 1e6) == pytest.approx(205.8, abs=0.1)
    assert counts.gradient_mb("vanilla") < counts.gradient_mb("text_aware")
    one_step = 4 * trainable / (counts.ALLREDUCE_GB_PER_S * 1e9)
    assert counts.allreduce_seconds("text_aware", 1) == 0
    assert counts.allreduce_seconds("text_aware", 2) == pytest.approx(one_step)
    assert counts.allreduce_seconds("text_aware", 4) == pytest.approx(1.5 * one_step)
    steps = st["steps_per_variant"]
    assert counts.training_minutes("text_aware", gpus=2) == pytest.approx(
        counts.training_minutes("text_aware") / 2 + steps * one_step / 60)
    with pytest.raises(ValueError, match="at least 1"):
        budget.notebook_projection("03", gpus=0)

    five, five_on_two = budget.notebook_projection("05"), budget.notebook_projection("05", gpus=2)
    grid = counts.images_minutes(st["grid_images"], references=st["grid_references"], segmented=True)
    assert five_on_two.minutes == pytest.approx(grid / 2 + counts.images_minutes(budget.TIMING_IMAGES))
    assert "(the grid split over the GPUs; the rest on one GPU)" in five.line()
    assert five.minutes_on(2) == pytest.approx(five_on_two.minutes) and five_on_two.minutes_on(1) == five.minutes
    for alone in ("01", "02", "04"):  # 01 makes its feature cache and masks in its own process
        assert budget.notebook_projection(alone, gpus=2).minutes == pytest.approx(budget.notebook_minutes(alone))
        assert "this notebook runs on one GPU" in budget.notebook_projection(alone).line()
    three = budget.notebook_projection("03", gpus=2)
    assert three.minutes == pytest.approx(
        counts.training_minutes("vanilla", gpus=2) + counts.training_minutes("text_aware", gpus=2)
        + counts.images_minutes(3 + budget.CARD_GRID_IMAGES))
    assert three.best < budget.notebook_projection("03").best and len(three.parts) == 2

    line = budget.notebook_projection("03").line()
    assert f"On 2xT4 (Kaggle's T4 x2): about {budget._m(three.minutes)} min (training split over the GPUs" in line
    assert "206 MB for text-aware, 0.05 s at an assumed 4 GB/s" in line and "\n" not in line
    assert three.line().startswith(f"Notebook 03 on 2xT4: about {budget._m(three.minutes)} min (training")
    assert f"On one T4: about {budget._m(budget.notebook_minutes('03'))} min." in three.line()
    series = budget.series_projection()
    assert series.minutes_on(2) == pytest.approx(sum(budget.notebook_projection(n, gpus=2).minutes
                                                     for n in budget.NOTEBOOKS))
    text = measured.training_speed_line(1.0, batch_size=2, gpus=2)
    assert "per GPU" in text and f"on 2xT4 (with {one_step:.2f} s of gradient all-reduce)" in text


def test_the_full_profiles_defaults_fit_one_sitting():
    """From the counted budget at the expected efficiencies, with the live defaults (profile, protocol): notebook
    03 at most 45 min, 05 at most 45 with at least 10 references, the whole series at most 90. Fails when a
    default grows past a limit: cut models, scales or steps (helpers.evaluate.protocol.GRID_MODELS), or make a
    run opt-in (Profile.train_neighbour)."""
    from helpers.evaluate.protocol import grid_models, grid_references, grid_size
    from helpers.profile import full_profile

    full = full_profile("test")
    references = grid_references(full, 10**6)
    images = grid_size(references * (1 + full.eval_edits_per_reference), len(grid_models(full)),
                       len(full.eval_scales), len(full.eval_seeds))
    now = dict(neighbour=full.train_neighbour, grid_images=images, references=references,
               inference_steps=full.num_inference_steps)
    limit = budget.LIMIT_MINUTES
    # the segmenter is counted: 01 masks every row, 05 segments every grid image
    assert any("CLIPSeg" in what for what, _ in budget.notebook_projection("01").parts)
    assert any("CLIPSeg" in what for what, _ in budget.notebook_projection("05", **now).parts)
    assert budget.notebook_minutes("03", **now) <= limit["03"]
    assert budget.notebook_minutes("05", **now) <= limit["05"] and references >= 10
    assert budget.series_minutes(**now) <= limit["series"]
    # why the neighbour-paired run is opt-in: with it, 03 would not fit
    assert budget.notebook_minutes("03", **{**now, "neighbour": True}) > limit["03"]


def test_the_notebooks_image_counts_are_what_their_cells_make():
    """The counts notebook_projection uses for 03 and 04 against the helpers those cells call."""
    import inspect

    from helpers.profile import full_profile
    from helpers.sample.generate import GALLERY_PROMPTS
    from helpers.share.hub import sample_grid

    full = full_profile("test")
    assert (budget.SAMPLE_REFERENCES, budget.GALLERY_PROMPTS, budget.SWEEP_SCALES) == (
        full.sample_references, len(GALLERY_PROMPTS), len(full.sweep_scales))
    card = inspect.signature(sample_grid).parameters["n_references"].default
    assert budget.CARD_GRID_IMAGES == card * len(GALLERY_PROMPTS[1:3]) * 2  # pretrained beside the adapter
    assert "GALLERY_PROMPTS[1:3]" in inspect.getsource(sample_grid)


def test_the_budget_was_counted_at_the_full_profiles_defaults_and_todays_grid():
    """Fails when the profile's defaults or the registry's models change: then run python bench/t4_budget.py."""
    from helpers.evaluate import protocol
    from helpers.evaluate.protocol import grid_size
    from helpers.profile import full_profile
    from helpers.sample.registry import MODEL_NAMES

    full, st = full_profile("test"), counts.t4_budget()["settings"]
    references, models = protocol.grid_references(full, 10**6), len(protocol.grid_models(full))
    counted = {k: st[k] for k in ("resolution", "train_batch_size", "epochs", "scheduler", "inference_steps",
                                  "guidance_scale", "grid_references", "grid_models", "grid_images",
                                  "notebook_03_runs")}
    now = {"resolution": full.resolution, "train_batch_size": full.train_batch_size, "epochs": full.num_epochs,
           "scheduler": full.scheduler, "inference_steps": full.num_inference_steps,
           "guidance_scale": full.guidance_scale, "grid_references": references, "grid_models": models,
           "grid_images": grid_size(references * (1 + full.eval_edits_per_reference), models,
                                    len(full.eval_scales), len(full.eval_seeds)),
           "notebook_03_runs": budget.notebook_03_runs(full.train_neighbour)}
    assert set(protocol.grid_models(full)) <= set(MODEL_NAMES)
    assert counted == now, "helpers/support/t4_budget.json is stale: run python bench/t4_budget.py"
    assert st["steps_per_variant"] == full.num_epochs * math.ceil(st["train_images"] / full.train_batch_size)


def test_reading_the_budget_imports_no_torch():
    """Each of the three budget modules, and a figure from each, without torch or diffusers."""
    code = ("import sys; from helpers.support import budget, budget_counts, budget_measured; budget.grid_minutes(); "
            "budget.summary_lines(); budget_counts.training_minutes(); budget_measured.training_speed_line(1.0); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def tiny_budget(tiny_profile, tmp_path_factory):
    """bench/t4_budget.py run once on the tiny models: (the file, what it printed)."""
    import contextlib
    import io

    sys.path.insert(0, str(ROOT / "bench"))
    import t4_budget

    out, printed = tmp_path_factory.mktemp("budget") / "budget.json", io.StringIO()
    with contextlib.redirect_stdout(printed):
        t4_budget.main(["--profile", "tiny", "--output", str(out), "--variants", "text_aware", "--no-checkpointing"])
    return out, printed.getvalue()


def test_the_benchmark_at_tiny_shapes_writes_a_budget_the_reader_reads(tiny_profile, tiny_budget):
    """bench/t4_budget.py end to end on the tiny models: counts, the emulation check, the file, the report."""
    from helpers.model.official_format import adapter_parameters

    out, printed = tiny_budget
    b = json.loads(out.read_text())
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
    g = b["segmenter"]  # the tiny CLIPSeg from its folder, at its processor's size, segment's batch
    from helpers.data.masks import load_segmenter

    tiny_seg = load_segmenter(tiny_profile.segmenter, device="cpu")
    assert g["parameters"] == sum(p.numel() for p in tiny_seg.model.parameters())
    assert g["batch"] == 8 and g["image_size"] == tiny_seg.processor.image_processor.size["height"]
    assert g["parts_gib"]["parameters"] == pytest.approx(2 * g["parameters"] / 2**30, rel=0.05)  # fp16, 512 B blocks
    assert g["tflop_per_image"] > 0 and g["peak_gib"] > g["parts_gib"]["parameters"]
    assert _close(budget.projections(b), b["projections"])
    assert counts.training_minutes("text_aware", efficiency=0.25, budget=b) > 0
    assert "03" not in b["projections"]["notebook_minutes"] and "series" not in b["projections"]["notebook_minutes"]


def test_counting_only_the_segmenter_again_keeps_every_other_count_as_it_is(tiny_budget, tmp_path, capsys):
    """`--only segmenter` recounts CLIPSeg into an existing file: the training, sampling and check sections stay
    byte for byte, the projections follow the new count, and a file counted at other settings is refused."""
    import t4_budget  # bench/, on the path since tiny_budget

    out = tmp_path / "budget.json"
    fresh = json.loads(tiny_budget[0].read_text())
    edited = json.loads(tiny_budget[0].read_text())
    edited["segmenter"]["tflop_per_image"] *= 1000  # as if the model had changed since
    edited["projections"]["notebook_minutes"]["05"]["expected"] = 0.0
    out.write_text(json.dumps(edited, indent=1) + "\n")
    t4_budget.main(["--profile", "tiny", "--output", str(out), "--only", "segmenter"])
    again = json.loads(out.read_text())
    assert "the other counts stay" in capsys.readouterr().out
    for key in ("settings", "training", "sampling", "emulation_check"):
        assert json.dumps(again[key]) == json.dumps(fresh[key])
    assert {k: v for k, v in again["how"].items() if k != "segmenter"} == {
        k: v for k, v in fresh["how"].items() if k != "segmenter"}
    assert again["segmenter"] == fresh["segmenter"] and again["projections"] == fresh["projections"]
    assert "(counted " in again["how"]["segmenter"]
    edited["settings"]["epochs"] += 1
    out.write_text(json.dumps(edited))
    with pytest.raises(SystemExit, match=r"\(epochs\): run the full count"):
        t4_budget.main(["--profile", "tiny", "--output", str(out), "--only", "segmenter"])


def test_readme_quotes_the_counted_budget_as_it_is():
    """README's figures come from the file: its budget block is summary_lines() word for word."""
    from pathlib import Path

    from helpers.support.budget import summary_lines

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "```text\n" + "\n".join(summary_lines()) + "\n```" in readme, \
        "README's 'What it costs on a T4' block is stale: paste summary_lines() again (README says how)"
