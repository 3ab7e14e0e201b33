"""helpers.evaluate.plots: every model by its label; each grid row holds one reference and prompt across the
models; the histogram marks zero."""
import pytest
from PIL import Image
from _rows import synthetic_rows

from helpers.evaluate.plots import (
    bootstrap_histogram,
    category_grids,
    scale_sweep,
    tradeoff_plot,
)
from helpers.evaluate.protocol import EDIT_PROMPTS, build_prompts
from helpers.evaluate.stats import CATEGORIES, EDIT, matched_gain, summarize
from helpers.sample.generate import Sample
from helpers.sample.references import Reference
from helpers.sample.registry import MODEL_NAMES, label

LABELS = [label(m) for m in MODEL_NAMES]


def test_tradeoff_plot_has_every_model_by_label_with_interval_bars():
    rows = synthetic_rows(dict.fromkeys(MODEL_NAMES, 0.0), n_refs=5)
    summary = summarize(rows, prompt_kind=EDIT)
    fig = tradeoff_plot(summary, clip_model="tiny-clip", dino_model="tiny-dino", copy_clip_t=0.3)
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == LABELS
    assert "tiny-clip" in fig.axes[0].get_xlabel() and "tiny-dino" in fig.axes[1].get_ylabel()
    assert len(fig.axes[0].containers) == len(MODEL_NAMES)  # one errorbar container per model
    with_subject = tradeoff_plot(summarize(synthetic_rows(dict.fromkeys(MODEL_NAMES[:2], 0.0), n_refs=5, subject=True),
                                           prompt_kind=EDIT), clip_model="tiny-clip")
    assert len(with_subject.axes) == 3 and with_subject.axes[2].get_ylabel().startswith("CLIP-I subject")
    assert with_subject.axes[2].get_xlabel().startswith("CLIP-T")  # CLIP-T against the subject score


def references(n=4, size=32):
    return [Reference(f"r{i}", Image.new("RGB", (size, size), (60 * i, 20, 200)), f"caption {i}", f"g{i}")
            for i in range(n)]


def fake_rows_and_samples(refs, prompts, scales=(0.5, 1.0)):
    """One row and one Sample per model x scale x prompt, the image coloured by model, reference and prompt."""
    rows, samples = [], {}
    for m_i, m in enumerate(MODEL_NAMES):
        for s in scales:
            for p_i, p in enumerate(prompts):
                im = Image.new("RGB", (32, 32), (25 * m_i, 5 * p_i, int(100 * s)))
                row = {"model": m, "scale": s, "reference": p.reference, "prompt": p.prompt, "seed": 0}
                rows.append(row)
                samples[(m, s, p.reference, p.prompt)] = Sample(im, m, p.reference, p.prompt, s, 0, 2, 7.5,
                                                               reference_image=refs[int(p.reference[1:])].image)
    return rows, lambda picked: [samples[(r["model"], r["scale"], r["reference"], r["prompt"])] for r in picked]


def test_one_grid_per_edit_category_same_reference_and_prompt_across_models():
    refs = references(8)
    prompts = build_prompts(refs, EDIT_PROMPTS, len(CATEGORIES))  # every category for each reference
    rows, load = fake_rows_and_samples(refs, prompts)
    grids = category_grids(rows, prompts, load, n_rows=2)
    assert list(grids) == list(CATEGORIES)
    for cat, grid in grids.items():
        assert grid.info["cols"] == LABELS and 1 <= len(grid.info["rows"]) <= 2
        for row_label in grid.info["rows"]:
            ref, prompt = row_label.split("\n")
            assert any(p.reference == ref and p.prompt == prompt and p.edit == cat for p in prompts)
        assert "scale 0.5" in grid.info["title"]
    # the pixels: in a row, model j's picture is the one made from that row's reference and prompt
    grid = grids["style"]
    ref, prompt = grid.info["rows"][0].split("\n")
    p_i = next(i for i, p in enumerate(prompts) if p.reference == ref and p.prompt == prompt)
    cell = 128
    header = grid.height - cell * len(grid.info["rows"])
    for j in range(len(MODEL_NAMES)):
        assert grid.getpixel((cell * (2 + j) + cell // 2, header + cell // 2)) == (25 * j, 5 * p_i, 50)


def test_scale_sweep_rows_are_models_by_label():
    refs = references(2)
    prompts = build_prompts(refs, EDIT_PROMPTS, 1)
    rows, load = fake_rows_and_samples(refs, prompts)
    sweep = scale_sweep(load(rows), prompts[1].reference, prompts[1].prompt)
    assert sweep.info["rows"] == LABELS and sweep.info["cols"] == ["scale 0.5", "scale 1"]
    with pytest.raises(ValueError, match="no samples"):
        scale_sweep(load(rows), "r0", "no such prompt")


def test_bootstrap_histogram_marks_zero_and_the_interval():
    rows = synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": 0.02}, noise=0.01)
    g = matched_gain(rows, "finetuned-text-aware", "pretrained")
    fig = bootstrap_histogram([g, None])
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and sum(p.get_height() for p in ax.patches if hasattr(p, "get_height")) >= len(g.boots)
    vertical = {round(line.get_xdata()[0], 6) for line in ax.get_lines()}
    assert 0.0 in vertical and round(g.gain, 6) in vertical
    assert label("pretrained") in ax.get_title().replace("\n", " ")
    with pytest.raises(ValueError, match="no bootstrap draws"):
        bootstrap_histogram([None])


def test_save_figure_writes_whole_files_or_keeps_the_old_one(tmp_path, monkeypatch):
    """Figures and grids go to disk atomically (the model card reads tradeoff.png): a full disk during the write
    (patched) raises DiskFull naming the file and keeps the old picture, with no temporary left."""
    import errno

    import matplotlib.pyplot as plt

    from helpers.evaluate.plots import save_figure
    from helpers.support.disk import DiskFull

    rows = synthetic_rows(dict.fromkeys(MODEL_NAMES[:2], 0.0), n_refs=3)
    fig = tradeoff_plot(summarize(rows, prompt_kind=EDIT))
    path = save_figure(fig, tmp_path / "tradeoff.png", dpi=50)
    grid = save_figure(Image.new("RGB", (8, 8), "red"), tmp_path / "grid.jpg")
    with Image.open(path) as a, Image.open(grid) as b:
        assert a.format == "PNG" and b.format == "JPEG"
    old = path.read_bytes()

    def full(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(fig), "savefig", full)
    with pytest.raises(DiskFull, match="tradeoff.png"):
        save_figure(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["grid.jpg", "tradeoff.png"]
