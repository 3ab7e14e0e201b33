"""helpers.evaluation: the protocol on plain data, with a stand-in for generation (no diffusion here)."""
from dataclasses import dataclass

import pandas as pd
import pytest
from PIL import Image, ImageOps

from helpers import evaluation as ev
from helpers import figures
from helpers.bank import MODEL_NAMES
from helpers.sampling import Reference, pick_references


@dataclass
class FakeSample:  # the fields of helpers.sampling.Sample that the evaluation reads
    image: Image.Image
    model: str
    reference: str
    prompt: str
    scale: float
    seed: int
    steps: int = 2
    guidance: float = 7.5


def fake_generate(bank, references, prompts, *, models=None, scales=(1.0,), seeds=(0,), **kwargs):
    """Like helpers.sampling.generate: models x scales x references x prompts x seeds, in that order.
    The "image" is the reference blended towards grey, more so at low scale."""
    out = []
    for m in models or bank:
        for s in scales:
            for r, image in references.items():
                grey = Image.new("RGB", image.size, (128, 128, 128))
                for p in prompts[r]:
                    for seed in seeds:
                        out.append(FakeSample(Image.blend(grey, image, s), m, r, p, s, seed))
    return out


@pytest.fixture(scope="module")
def split(tiny_profile, tmp_path_factory):
    """Notebook 01's leak-free split of the tiny dataset (helpers.data), as lists of rows."""
    from helpers.data import prepare_dataset

    prep = prepare_dataset(tiny_profile.dataset, tmp_path_factory.mktemp("data"), resolution=tiny_profile.resolution,
                           test_fraction=tiny_profile.test_fraction, seed=0, progress=False)
    return [prep.train[i] for i in range(len(prep.train))], [prep.test[i] for i in range(len(prep.test))]


EDITS = {"setting": ["a cartoon character on a beach", "a cartoon character in a forest at night"],
         "outfit": ["a cartoon character wearing a red hat", "a cartoon character wearing a black coat"],
         "action": ["a cartoon character dancing", "a cartoon character eating"],
         "style": ["a watercolor painting of a character", "a pixel art character"]}


def test_references_one_per_group_from_the_test_split(split):
    train, test = split
    refs = pick_references(test, 4, seed=0)
    assert len(refs) == 4 and len({r.group for r in refs}) == 4
    assert len(pick_references(test, 100)) == len({r["group"] for r in test})
    ev.check_held_out(refs, train)  # held-out references pass


def test_training_references_are_refused(split):
    train, test = split
    row = train[0]
    same = Reference(row["id"], row["image"], row["text"], str(row["group"]))
    with pytest.raises(ev.TrainingImageError, match=f"reference {row['id']!r}.*id is in the training split"):
        ev.check_held_out([same], train)
    # a mirrored, resized copy under a new id and group is still found (perceptual hash), also when the
    # training split does not hold the mirrored twin
    copy = Reference("new", ImageOps.mirror(row["image"]).resize((96, 96)), row["text"], "new-group")
    with pytest.raises(ev.TrainingImageError, match="reference 'new': it matches training image"):
        ev.check_held_out([copy], train)
    no_twin = [r for r in train if r["group"] != row["group"] or r["id"] == row["id"]]
    with pytest.raises(ev.TrainingImageError, match=f"mirrored it matches training image {row['id']!r}"):
        ev.check_held_out([copy], no_twin)
    # and the whole evaluation refuses before generating anything
    called = []
    with pytest.raises(ev.TrainingImageError, match="held-out test split"):
        ev.run_grid(["m"], [copy], [ev.PromptSpec("new", "x", ev.OWN)], train=train, scales=(1.0,),
                    generate=lambda *a, **k: called.append(1))
    assert not called


def test_prompts_own_caption_plus_rotating_edits(split):
    refs = pick_references(split[1], 6)
    specs = ev.build_prompts(refs, EDITS, 2)
    for r in refs:
        mine = [s for s in specs if s.reference == r.id]
        assert [s.kind for s in mine] == [ev.OWN, ev.EDIT, ev.EDIT] and mine[0].prompt == r.caption
    edits = [s.prompt for s in specs if s.kind == ev.EDIT]
    n = sum(len(v) for v in EDITS.values())
    assert sorted(edits[:n]) == sorted(p for v in EDITS.values() for p in v)  # all used before any repeats
    assert len({s.edit for s in specs[:3 * 2] if s.kind == ev.EDIT}) == 4  # categories interleaved
    with pytest.raises(ValueError, match="edits_per_reference"):
        ev.build_prompts(refs, EDITS, 9)


def test_grid_writes_one_csv_row_per_image(split, tiny_profile, tmp_path):
    train, test = split
    refs = pick_references(test, 3)
    specs = ev.build_prompts(refs, EDITS, 1)
    models, scales, seeds = ["pretrained", "finetuned-vanilla"], (0.5, 1.0), (0, 1)
    result = ev.run_grid(models, refs, specs, train=train, scales=scales, seeds=seeds, out_dir=tmp_path,
                         clip=tiny_profile.eval_clip, dino=tiny_profile.dino, generate=fake_generate)
    n = ev.grid_size(len(specs), len(models), len(scales), len(seeds))
    assert len(result.samples) == len(result.rows) == n
    table = pd.read_csv(result.csv)
    assert len(table) == n and list(table.columns) == list(ev.CSV_COLUMNS)
    assert set(table["prompt_kind"]) == {ev.OWN, ev.EDIT} and (table["clip_model"] == tiny_profile.eval_clip).all()
    assert all((tmp_path / f).is_file() for f in table["file"])
    # the rows carry the metrics of their own image
    from helpers import metrics

    k = 5
    s = result.samples[k]
    ref = next(r for r in refs if r.id == s.reference)
    assert table["clip_i"][k] == pytest.approx(float(metrics.clip_i([s.image], [ref.image], clip=tiny_profile.eval_clip)[0]), abs=1e-5)
    assert table["clip_t"][k] == pytest.approx(float(metrics.clip_t([s.image], [s.prompt], clip=tiny_profile.eval_clip)[0]), abs=1e-5)
    assert ev.read_csv(result.csv)[k]["prompt"] == s.prompt
    # the "copy the reference" line: CLIP-T of the references themselves with their edit prompts
    edits = [p for p in specs if p.kind == ev.EDIT]
    by_id = {r.id: r.image for r in refs}
    direct = metrics.clip_t([by_id[p.reference] for p in edits], [p.prompt for p in edits], clip=tiny_profile.eval_clip)
    assert ev.copy_baseline(refs, specs, clip=tiny_profile.eval_clip)[ev.EDIT][0] == pytest.approx(float(direct.mean()), abs=1e-6)


def test_side_by_side_and_scale_sweep_grids(split):
    sampling = pytest.importorskip("helpers.sampling")
    refs = pick_references(split[1], 3)
    specs = ev.build_prompts(refs, EDITS, 1)
    fakes = fake_generate(list(MODEL_NAMES), {r.id: r.image for r in refs},
                          {r.id: [p.prompt for p in specs if p.reference == r.id] for r in refs}, scales=(0.3, 0.5, 1.0))
    ref_image = {r.id: r.image for r in refs}
    samples = [sampling.Sample(f.image, f.model, f.reference, f.prompt, f.scale, f.seed, f.steps, f.guidance,
                               reference_image=ref_image[f.reference]) for f in fakes]
    grid = figures.side_by_side(samples, n_rows=2, prompts=specs)
    assert grid.info["cols"] == list(MODEL_NAMES) and len(grid.info["rows"]) == 2
    assert all(any(p.prompt in row for p in specs if p.kind == ev.EDIT) for row in grid.info["rows"])
    sweep = figures.scale_sweep(samples, refs[0].id, refs[0].caption)
    assert sweep.info["rows"] == list(MODEL_NAMES) and sweep.info["cols"] == ["scale 0.3", "scale 0.5", "scale 1"]
