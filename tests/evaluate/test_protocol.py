"""helpers.evaluate.protocol and helpers.evaluate.grid: the protocol on plain data, with a stand-in for generation (no
diffusion here), results written row by row and resumed; the command line on the tiny models."""

import pandas as pd
import pytest
from _grid import EDITS, Interrupted, fake_generate, grid, identities, interrupted_after, split  # noqa: F401
from PIL import Image, ImageOps

import helpers.evaluate.grid as grid_module
from helpers.data.prepare import use_prepared
from helpers.evaluate.__main__ import main as evaluation_main
from helpers.evaluate.grid import run_grid
from helpers.evaluate.metrics import clip_i, clip_t
from helpers.evaluate.protocol import (
    ALL_MODELS,
    GRID_EFFICIENCY,
    GRID_MODELS,
    MIN_REFERENCES,
    PromptSpec,
    TrainingImageError,
    build_prompts,
    check_held_out,
    copy_baseline,
    grid_models,
    grid_references,
    grid_size,
    protocol,
)
from helpers.evaluate.results import (
    CSV_COLUMNS,
    KEY_COLUMNS,
    ResultsFile,
    ResultsFileError,
)
from helpers.evaluate.stats import EDIT, OWN
from helpers.sample.generate import generate
from helpers.sample.references import Reference, pick_references
from helpers.sample.registry import MODEL_NAMES


def test_references_one_per_group_from_the_test_split(split):
    train, test = split
    refs = pick_references(test, 4, seed=0)
    assert len(refs) == 4 and len({r.group for r in refs}) == 4
    assert len(pick_references(test, 100)) == len({r["group"] for r in test})
    check_held_out(refs, train)  # held-out references pass


def test_training_references_are_refused(split):
    train, test = split
    row = train[0]
    same = Reference(row["id"], row["image"], row["text"], str(row["group"]))
    with pytest.raises(TrainingImageError, match=f"reference {row['id']!r}.*id is in the training split"):
        check_held_out([same], train)
    # a mirrored, resized copy under a new id and group is still found (perceptual hash), also when the
    # training split does not hold the mirrored twin
    copy = Reference("new", ImageOps.mirror(row["image"]).resize((96, 96)), row["text"], "new-group")
    with pytest.raises(TrainingImageError, match="reference 'new': it matches training image"):
        check_held_out([copy], train)
    no_twin = [r for r in train if r["group"] != row["group"] or r["id"] == row["id"]]
    with pytest.raises(TrainingImageError, match=f"mirrored it matches training image {row['id']!r}"):
        check_held_out([copy], no_twin)
    # and the whole evaluation refuses before generating anything
    called = []
    with pytest.raises(TrainingImageError, match="held-out test split"):
        run_grid(["m"], [copy], [PromptSpec("new", "x", OWN)], train=train, scales=(1.0,), steps=2,
                 guidance=7.5, generate=lambda *a, **k: called.append(1))
    assert not called


def test_prompts_own_caption_plus_edits_chosen_by_the_reference_id(split):
    refs = pick_references(split[1], 6)
    specs = build_prompts(refs, EDITS, 2)
    for r in refs:
        mine = [s for s in specs if s.reference == r.id]
        assert [s.kind for s in mine] == [OWN, EDIT, EDIT] and mine[0].prompt == r.caption
        assert len({s.edit for s in mine[1:]}) == 2  # two categories
    with pytest.raises(ValueError, match="edits_per_reference"):
        build_prompts(refs, EDITS, 9)


def _prompts_by_reference(refs, k=2):
    out = {}
    for s in build_prompts(refs, EDITS, k):
        out.setdefault(s.reference, []).append((s.kind, s.edit, s.prompt))
    return out


def test_adding_references_keeps_the_prompts_of_those_already_scored(split):
    """Edits follow the reference's id, not its position: [a, b, c] and [a, b, c, d, e], the list reversed, or
    notebook 05 asking pick_references for more (the new ones land between the old ones: the positions shift)
    give a, b and c the same prompts."""
    five = [Reference(f"ref-{i}", Image.new("RGB", (8, 8)), "a drawing") for i in range(5)]
    first = _prompts_by_reference(five[:3])
    assert {r: _prompts_by_reference(five)[r] for r in first} == first
    assert {r: _prompts_by_reference(five[::-1])[r] for r in first} == first
    fewer, more = pick_references(split[1], 3), pick_references(split[1], 5)
    assert [r.id for r in more[:3]] != [r.id for r in fewer] and {r.id for r in fewer} < {r.id for r in more}
    before = _prompts_by_reference(fewer)
    assert {r: _prompts_by_reference(more)[r] for r in before} == before


def test_edits_spread_over_every_prompt_and_never_repeat_the_caption():
    def ref(i, caption="a drawing"):
        return Reference(f"ref-{i}", Image.new("RGB", (8, 8)), caption)

    used = [s for s in build_prompts([ref(i) for i in range(200)], EDITS, 2) if s.kind == EDIT]
    assert {s.prompt for s in used} == {p for v in EDITS.values() for p in v}
    assert all(80 <= sum(s.edit == c for s in used) <= 120 for c in EDITS)  # 100 each on average
    caption = EDITS["outfit"][0]  # an edit that is a reference's own caption is not used for it
    for i in range(20):
        mine = [s for s in build_prompts([ref(i, caption)], EDITS, 2) if s.kind == EDIT]
        assert len(mine) == 2 and caption not in [s.prompt for s in mine]


def test_grid_writes_one_csv_row_per_image_for_every_model(split, tiny_profile, tmp_path):
    result, refs, specs = grid(split, tiny_profile, tmp_path)
    n = grid_size(len(specs), len(MODEL_NAMES), 2, 2)
    assert len(result.rows) == n and result.n_generated == n and result.n_resumed == 0
    table = pd.read_csv(result.csv)
    assert len(table) == n and list(table.columns) == list(CSV_COLUMNS)
    counts = table.groupby("model").size()
    assert set(counts.index) == set(MODEL_NAMES) and (counts == n // len(MODEL_NAMES)).all()
    assert not table.duplicated(list(KEY_COLUMNS)).any()  # one row per image
    assert set(table["prompt_kind"]) == {OWN, EDIT} and (table["clip_model"] == tiny_profile.eval_clip).all()
    assert set(table.loc[table["prompt_kind"] == EDIT, "edit"]) <= set(EDITS)
    assert all((tmp_path / f).is_file() for f in table["file"]) and table["file"].nunique() == n
    # the rows carry the metrics of their own image (scored in memory, before the JPEG was written)

    k = 5
    row = result.rows[k]
    s = fake_generate(identities(MODEL_NAMES), {row["reference"]: next(r.image for r in refs if r.id == row["reference"])},
                      {row["reference"]: [row["prompt"]]}, models=[row["model"]], scales=(row["scale"],),
                      seeds=(row["seed"],))[0]
    ref = next(r for r in refs if r.id == s.reference)
    assert row["clip_i"] == pytest.approx(float(clip_i([s.image], [ref.image], clip=tiny_profile.eval_clip)[0]), abs=1e-5)
    assert row["clip_t"] == pytest.approx(float(clip_t([s.image], [s.prompt], clip=tiny_profile.eval_clip)[0]), abs=1e-5)
    assert ResultsFile(result.csv).rows == result.rows  # typed, exactly as written
    # the "copy the reference" line: CLIP-T of the references themselves with their edit prompts
    edits = [p for p in specs if p.kind == EDIT]
    by_id = {r.id: r.image for r in refs}
    direct = clip_t([by_id[p.reference] for p in edits], [p.prompt for p in edits], clip=tiny_profile.eval_clip)
    assert copy_baseline(refs, specs, clip=tiny_profile.eval_clip)[EDIT][0] == pytest.approx(float(direct.mean()), abs=1e-6)


def test_an_interrupted_grid_resumes_to_the_same_csv(split, tiny_profile, tmp_path):
    whole, _, _ = grid(split, tiny_profile, tmp_path / "whole")
    stop = interrupted_after(7)
    with pytest.raises(Interrupted):
        grid(split, tiny_profile, tmp_path / "cut", generate=stop)
    written = ResultsFile(tmp_path / "cut" / "results.csv").rows
    assert 0 < len(written) == len(stop.made) < len(whole.rows)  # every image made so far is on disk
    again, _, _ = grid(split, tiny_profile, tmp_path / "cut")
    assert again.n_resumed == len(written) and again.n_generated == len(whole.rows) - len(written)
    assert (tmp_path / "cut" / "results.csv").read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()
    assert again.rows == whole.rows
    # a crash in the middle of a write: the cut line is dropped and its job made again
    csv = tmp_path / "cut" / "results.csv"
    text = csv.read_text()
    csv.write_text(text[: len(text) - 40])
    third, _, _ = grid(split, tiny_profile, tmp_path / "cut")
    assert third.n_generated >= 1 and csv.read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()
    # a finished grid makes nothing more
    nothing = interrupted_after(0)
    done, _, _ = grid(split, tiny_profile, tmp_path / "cut", generate=nothing)
    assert done.n_generated == 0 and done.rows == whole.rows
    # scores from another CLIP model do not mix
    with pytest.raises(ResultsFileError, match="scored with CLIP"):
        ResultsFile(csv, clip_model="another/clip")


def test_grid_samples_are_the_images_of_the_rows(split, tiny_profile, tmp_path):
    saved, refs, _ = grid(split, tiny_profile, tmp_path, models=MODEL_NAMES[:2])
    in_memory, _, _ = grid(split, tiny_profile, None, models=MODEL_NAMES[:2])
    assert in_memory.rows == [dict(r, file="") for r in saved.rows]
    rows = saved.rows[3:6]
    for a, b in zip(saved.samples(rows), in_memory.samples(rows)):
        assert (a.model, a.reference, a.prompt, a.scale, a.seed) == (b.model, b.reference, b.prompt, b.scale, b.seed)
        assert a.image.size == b.image.size and a.reference_image is not None
        diff = abs(pd.Series(list(a.image.convert("L").getdata())) - pd.Series(list(b.image.convert("L").getdata())))
        assert diff.mean() < 3  # the saved JPEG is the image (quality 95)


def test_default_size_comes_from_the_counted_t4_budget():
    """The full profile's grid is the headline comparison over the most references whose images take at most
    eval_minutes on a T4 at GRID_EFFICIENCY (the expected 12%) of its peak, counted (helpers.support.budget),
    and never fewer than MIN_REFERENCES."""
    from helpers.profile import full_profile
    from helpers.support.budget_counts import SAMPLING, images_minutes

    full = full_profile("test")
    assert full.eval_num_references is None and full.eval_edits_per_reference > 1  # sized, not typed
    assert GRID_EFFICIENCY == SAMPLING.expected
    prompts, plenty, models = 1 + full.eval_edits_per_reference, 10**6, len(grid_models(full))

    def images(n, models=models):
        return grid_size(n * prompts, models, len(full.eval_scales), len(full.eval_seeds))

    n = grid_references(full, plenty)
    assert n >= MIN_REFERENCES == 10
    assert images_minutes(images(n), GRID_EFFICIENCY) <= full.eval_minutes
    assert images_minutes(images(n + 1), GRID_EFFICIENCY) > full.eval_minutes
    assert grid_references(full, 3) == min(n, 3)  # never more than the test split's groups
    more = full.replace(eval_minutes=2 * full.eval_minutes)  # one field for a user with more time
    assert grid_references(more, plenty) >= 2 * n - 1
    assert grid_references(full.replace(eval_num_references=4), plenty) == 4  # a number, when given, is used
    # every model of the registry, or more scales: the grid grows past eval_minutes and keeps its references, so
    # a later sitting that adds them extends the grid already scored
    every = full.replace(eval_models=(ALL_MODELS,))
    assert grid_references(every, plenty) == grid_references(full.replace(eval_scales=(0.2, 0.4, 0.6, 0.8, 1.0)),
                                                             plenty) == n
    assert images_minutes(images(n, len(MODEL_NAMES)), GRID_EFFICIENCY) > full.eval_minutes


def test_the_default_grid_is_the_headline_comparison_and_the_rest_one_setting_away():
    from helpers.profile import full_profile

    full = full_profile("test")
    assert grid_models(full) == list(GRID_MODELS) == ["finetuned-text-aware", "finetuned-vanilla",
                                                      "finetuned-text-aware-no-block"]
    bank = ["pretrained", "pretrained-instantstyle", "finetuned-vanilla", "finetuned-text-aware",
            "finetuned-text-aware-no-block", "mine"]  # "mine": an extra model the user loaded
    assert grid_models(full, bank) == [*GRID_MODELS, "mine"]
    assert grid_models(full.replace(eval_models=(ALL_MODELS,)), bank) == [
        *GRID_MODELS, "pretrained", "pretrained-instantstyle", "mine"]
    assert grid_models(full.replace(eval_models=("pretrained", "finetuned-text-aware")), bank) == [
        "finetuned-text-aware", "pretrained", "mine"]
    # notebook 03 not run: the bank has the pretrained models only, and the grid takes them
    assert grid_models(full, ["pretrained", "pretrained-conceptrol"]) == ["pretrained", "pretrained-conceptrol"]
    assert grid_models(full, ["pretrained", "finetuned-text-aware"]) == ["finetuned-text-aware"]
    with pytest.raises(ValueError, match="finetuned-text-aware-neighbour: not in the bank"):
        grid_models(full.replace(eval_models=("finetuned-text-aware-neighbour",)), bank)


def test_command_line_runs_the_protocol_and_resumes(tiny_profile, runs, tmp_path, monkeypatch, capsys):
    """python -m helpers.evaluate on the tiny models: cut after the first job, run again, and the CSV is
    the one an uninterrupted run writes, with notebook 05's references, prompts and every model."""

    args = ["--profile", "tiny", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(runs[0]),
            "--references", "1", "--edits-per-reference", "1", "--scales", "1.0"]
    whole = evaluation_main(args + ["--out-dir", str(tmp_path / "whole")])
    real = generate
    calls = []

    def cut(*a, **k):
        if calls:
            raise Interrupted("disconnected")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(grid_module, "generate_images", cut)
    with pytest.raises(Interrupted):
        evaluation_main(args + ["--out-dir", str(tmp_path / "cut")])
    monkeypatch.setattr(grid_module, "generate_images", real)
    capsys.readouterr()
    resumed = evaluation_main(args + ["--out-dir", str(tmp_path / "cut")])
    total = 2 * len(GRID_MODELS)  # 1 reference x (own caption + 1 edit) x 1 scale, the headline comparison
    assert f"Resuming: 2 of {total} images" in capsys.readouterr().out
    assert resumed.n_resumed == 2 and resumed.n_generated == total - 2
    assert (tmp_path / "cut" / "results.csv").read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()
    # the notebook's protocol: the same references and prompts, and by default the headline comparison's models
    profile = tiny_profile.replace(eval_num_references=1, eval_edits_per_reference=1, eval_scales=(1.0,))
    refs, prompts = protocol(profile, use_prepared(tmp_path / "data", profile, progress=False))
    table = pd.read_csv(tmp_path / "whole" / "results.csv")
    assert set(table["model"]) == set(GRID_MODELS) and len(table) == len(whole.rows) == len(GRID_MODELS) * len(prompts)
    assert set(zip(table["reference"].astype(str), table["prompt"])) == {(p.reference, p.prompt) for p in prompts}
    assert (tmp_path / "whole" / "summary.csv").is_file() and (tmp_path / "whole" / "headline.txt").is_file()
    # --models all (notebook 05's EVAL_MODELS = "all") grows the same folder: every model, the old rows kept
    before = (tmp_path / "whole" / "results.csv").read_bytes()
    every = evaluation_main(args + ["--out-dir", str(tmp_path / "whole"), "--models", ALL_MODELS])
    assert (every.n_resumed, every.n_generated) == (total, 2 * len(MODEL_NAMES) - total)
    assert {r["model"] for r in every.rows} == set(MODEL_NAMES)
    assert (tmp_path / "whole" / "results.csv").read_bytes().startswith(before)


def test_command_line_stops_at_once_when_another_writer_holds_the_folder(tmp_path):
    """python -m helpers.evaluate takes --out-dir's lock before loading anything: with notebook 05 (here, another
    process holding the lock as it does) on the same folder, it stops at once and names the other writer."""
    import subprocess
    import sys
    import time

    from helpers.support.lock import FolderInUse

    hold = ("import sys\nfrom helpers.support.lock import FolderLock\n"
            "with FolderLock(sys.argv[1], 'evaluation'):\n    print('held', flush=True)\n    sys.stdin.readline()\n")
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "eval")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(FolderInUse, match=f"in use by pid {other.pid} .*evaluation.* since"):
            evaluation_main(["--profile", "tiny", "--data-dir", str(tmp_path / "data"), "--batch-size", "1",
                             "--out-dir", str(tmp_path / "eval")])
        assert time.perf_counter() - start < 5 and not (tmp_path / "data").exists()  # nothing loaded or prepared
    finally:
        other.communicate("\n", timeout=30)
