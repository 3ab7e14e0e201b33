"""helpers.evaluate.grid: what makes the grid safe to stop and run again. Rows know their adapter (a retrained one
is evaluated again, not resumed), one writer per eval folder, images written whole, a full disk and an
out-of-memory error said plainly, and a rerun after each ends with the rows of an uninterrupted run."""
import errno
import shutil
import subprocess
import sys
import textwrap
import time

import _grid
import numpy as np
import pytest
import torch
from _grid import fake_generate, grid, identities, split  # noqa: F401
from _launch import as_process
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import helpers.evaluate.results as results_module
from helpers.evaluate.grid import BATCH_TOLERANCE, EvaluationOutOfMemory, run_grid
from helpers.evaluate.headline import headline
from helpers.evaluate.protocol import build_prompts
from helpers.evaluate.results import ResultsFile, row_key, share_path, share_paths
from helpers.evaluate.stats import matched_gain, summarize
from helpers.model.adapter_file import ADAPTER_FILE
from helpers.sample.references import pick_references
from helpers.sample.registry import MODEL_NAMES, adapter_sha256
from helpers.support.disk import DiskFull
from helpers.support.lock import FolderInUse, read_lock

TWO = MODEL_NAMES[:2]


def same_rows(a, b, tolerance=0.0):
    """Equal by row_key, in the same order, and every value equal (scores within `tolerance`)."""
    assert [row_key(r) for r in a] == [row_key(r) for r in b]
    for x, y in zip(a, b):
        for column, value in x.items():
            if isinstance(value, float) and column not in ("scale", "guidance"):
                assert value == pytest.approx(y[column], abs=tolerance, rel=0), column
            else:
                assert value == y[column], column


def test_a_retrained_adapter_is_evaluated_again_not_resumed(split, tiny_profile, runs, tmp_path, capsys):
    """Evaluate, retrain the text-aware adapter in the same run folder (a new file), evaluate again: its rows and
    its ablation's are made again, the pretrained model's resumed; the summary, the headline and the model card
    see only the current weights' rows."""
    from helpers.sample.bank import load_models
    from helpers.share.run_info import read_evaluation, read_run

    run_dir = tmp_path / "runs" / "text_aware"
    shutil.copytree(runs[0] / "text_aware", run_dir)
    train, test = split
    refs = pick_references(test, 1)
    prompts = build_prompts(refs, {"style": ["a watercolor painting of a character"]}, 1)
    models = ["pretrained", "finetuned-text-aware", "finetuned-text-aware-no-block"]

    def evaluate(out_dir, bank=None):
        bank = bank or load_models(tiny_profile, tmp_path / "runs", baselines=models[2:], device="cpu", verbose=False)
        result = run_grid(bank, refs, prompts, train=train, scales=(1.0,), out_dir=out_dir, models=models, steps=2,
                          clip=tiny_profile.eval_clip, dino=tiny_profile.dino, segmenter=tiny_profile.segmenter,
                          progress=False)
        (out_dir / "summary.csv").write_text(summarize(result.rows).to_csv(index=False))  # as 05 and the command do
        return bank, result

    eval_dir = tmp_path / "eval"
    old_bank, first = evaluate(eval_dir)
    old_id = adapter_sha256(run_dir / ADAPTER_FILE)
    assert old_bank.adapter_sha256("finetuned-text-aware") == old_bank.adapter_sha256(models[2]) == old_id
    assert {r["adapter_sha256"] for r in first.rows if r["model"] == "pretrained"} == {
        adapter_sha256(tiny_profile.ip_adapter)}  # the pretrained file's own identity
    assert read_evaluation(eval_dir, read_run(run_dir)).rows  # the card shows this adapter's numbers

    tensors = load_file(str(run_dir / ADAPTER_FILE))  # "retrain": other weights in the same file name
    with safe_open(str(run_dir / ADAPTER_FILE), "pt") as f:
        metadata = f.metadata()
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(run_dir / ADAPTER_FILE), metadata=metadata)
    new_id = adapter_sha256(run_dir / ADAPTER_FILE)
    assert new_id != old_id
    capsys.readouterr()
    assert read_evaluation(eval_dir, read_run(run_dir)) is None  # old numbers never reach the card
    assert f"not of {run_dir / ADAPTER_FILE} (sha256 {new_id}; theirs: {old_id})" in capsys.readouterr().out

    bank, again = evaluate(eval_dir)
    out = capsys.readouterr().out
    for m in models[1:]:
        assert f"model {m}: 2 rows of an earlier adapter (id {old_id}) are out of date; regenerating with id {new_id}" in out
    assert (again.n_generated, again.n_resumed, again.n_stale, again.n_other) == (4, 2, 4, 4)
    assert {r["adapter_sha256"] for r in again.rows if r["model"] != "pretrained"} == {new_id}
    _, fresh = evaluate(tmp_path / "fresh", bank)  # what a first evaluation of the new weights gives
    same_rows(again.rows, fresh.rows)
    assert again.rows[2]["clip_t"] != first.rows[2]["clip_t"]  # new images, so new scores
    assert len(ResultsFile(eval_dir / "results.csv").rows) == 10  # append-only: the old rows stay in the file...
    with pytest.raises(ValueError, match="more than one adapter per model"):
        summarize(ResultsFile(eval_dir / "results.csv").rows)  # ...and are refused if read back whole
    assert headline(again.rows) == headline(fresh.rows)
    card = read_evaluation(eval_dir, read_run(run_dir))
    assert card is not None and {r["adapter_sha256"] for r in card.rows} == {new_id}


HOLD = textwrap.dedent("""
    import sys, time
    from helpers.support.lock import FolderLock
    with FolderLock(sys.argv[1], "evaluation"):
        print("held", flush=True)
        sys.stdin.readline()
""")
TRY = textwrap.dedent("""
    import sys
    from helpers.support.lock import FolderInUse, FolderLock
    try:
        with FolderLock(sys.argv[1], "evaluation"):
            print("entered")
    except FolderInUse as e:
        print("refused:", e)
""")


def test_two_writers_on_one_eval_folder_the_second_stops_at_once(split, tiny_profile, tmp_path):
    eval_dir = tmp_path / "eval"
    whole, _, _ = grid(split, tiny_profile, tmp_path / "whole", models=TWO)
    # another process (a second notebook 05, or the command) holds the folder: this one stops before anything
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(eval_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        called = []
        start = time.perf_counter()
        with pytest.raises(FolderInUse, match=f"in use by pid {other.pid} .*evaluation"):
            grid(split, tiny_profile, eval_dir, models=TWO, generate=lambda *a, **k: called.append(1))
        assert time.perf_counter() - start < 5 and not called and not (eval_dir / "results.csv").exists()
    finally:
        other.communicate("\n", timeout=30)
    # while this one writes (after its first job), a second process is refused
    seen, made = [], []

    def generate(*a, **k):
        if made and not seen:
            seen.append(subprocess.run([sys.executable, "-c", TRY, str(eval_dir)], capture_output=True, text=True,
                                       timeout=60).stdout)
            assert read_lock(eval_dir)["purpose"] == "evaluation"
        out = fake_generate(*a, **k)
        made.extend(out)
        return out

    result, _, _ = grid(split, tiny_profile, eval_dir, models=TWO, generate=generate)
    assert seen and seen[0].startswith("refused:") and "evaluation" in seen[0]
    assert read_lock(eval_dir) is None  # given back at the end
    same_rows(result.rows, whole.rows)
    assert (eval_dir / "results.csv").read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()


def test_a_full_disk_names_the_file_and_a_rerun_ends_as_an_uninterrupted_run(split, tiny_profile, tmp_path,
                                                                          monkeypatch):
    whole, _, _ = grid(split, tiny_profile, tmp_path / "whole", models=TWO)
    eval_dir = tmp_path / "eval"
    full = OSError(errno.ENOSPC, "No space left on device")
    # the results.csv append: the rows of the job are written, then fsync fails; the file is cut back
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise full

    monkeypatch.setattr(results_module.os, "fsync", fsync)
    with pytest.raises(DiskFull, match=r"could not write .*results\.csv.*Free some space"):
        grid(split, tiny_profile, eval_dir, models=TWO)
    monkeypatch.undo()
    kept = ResultsFile(eval_dir / "results.csv").rows
    assert len(kept) == 2 * 4 and (eval_dir / "results.csv").read_text().endswith("\n")  # two whole jobs, no more
    # an image: nothing half written, no temporary left, and no row for it
    real_save = Image.Image.save

    def save(self, fp, format=None, **kw):
        if format == "JPEG":
            raise full
        return real_save(self, fp, format, **kw)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(DiskFull, match=r"could not write .*images/.*\.jpg"):
        grid(split, tiny_profile, eval_dir, models=TWO)
    monkeypatch.undo()
    assert len(ResultsFile(eval_dir / "results.csv").rows) == len(kept)
    assert not [p for p in eval_dir.rglob(".*") if p.name != ".lock.json"] and not (eval_dir / ".lock.json").exists()
    again, _, _ = grid(split, tiny_profile, eval_dir, models=TWO)
    assert again.n_resumed == len(kept)
    same_rows(again.rows, whole.rows)
    assert (eval_dir / "results.csv").read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()


def test_out_of_memory_names_the_batch_size_and_a_smaller_one_resumes(split, tiny_profile, bank, tmp_path,
                                                                     monkeypatch):
    """A CUDA out-of-memory error in the pipeline call (patched: there is no GPU here) stops the evaluation with
    the batch size to lower; a rerun at batch 1 resumes, and its rows agree with the batch-3 run within
    BATCH_TOLERANCE (the batch changes only the rounding)."""
    train, test = split
    refs = pick_references(test, 1)
    prompts = build_prompts(refs, {"style": ["a watercolor painting of a character", "a pixel art character"]}, 2)
    settings = dict(train=train, scales=(0.5, 1.0), seeds=(0, 1), models=["finetuned-text-aware"], steps=2,
                    clip=tiny_profile.eval_clip, dino=tiny_profile.dino, segmenter=tiny_profile.segmenter, progress=False)
    whole = run_grid(bank, refs, prompts, out_dir=tmp_path / "whole", batch_size=3, **settings)  # 2 jobs of 6
    pipeline = type(bank.pipe)
    real_call, calls = pipeline.__call__, []

    def call(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second job's first batch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *a, **k)

    monkeypatch.setattr(pipeline, "__call__", call)
    with pytest.raises(EvaluationOutOfMemory) as caught:
        run_grid(bank, refs, prompts, out_dir=tmp_path / "eval", batch_size=3, **settings)
    monkeypatch.undo()
    message = str(caught.value)
    for words in ("Out of GPU memory", "from 3 to 1", "EVAL_BATCH_SIZE = 1", "--batch-size 1", "changed on resume",
                  "6 rows are in", "finetuned-text-aware at IP scale 1"):
        assert words in message
    again = run_grid(bank, refs, prompts, out_dir=tmp_path / "eval", batch_size=1, **settings)
    assert (again.n_resumed, again.n_generated) == (6, 6)
    same_rows(again.rows[:6], whole.rows[:6])  # the rows made before the error, exactly
    same_rows(again.rows, whole.rows, tolerance=BATCH_TOLERANCE)  # made at batch 1 against batch 3
    assert max(abs(a["clip_t"] - b["clip_t"]) for a, b in zip(again.rows, whole.rows)) < BATCH_TOLERANCE


# --------------------------------------------------------------------------------------------------
# A grid that grows across sittings
# --------------------------------------------------------------------------------------------------

HEADLINE = ["finetuned-text-aware", "finetuned-vanilla"]  # two models of the headline comparison
WITH_OPT_IN = ["pretrained", *HEADLINE]  # and one opt-in model (listed first: the grid still runs it last)


def stopped_after(n_jobs):
    """fake_generate that raises KeyboardInterrupt (Colab's stop button, Ctrl-C) when job n_jobs + 1 starts."""
    calls = []

    def generate(*args, **kwargs):
        if len(calls) >= n_jobs:
            raise KeyboardInterrupt
        calls.append(1)
        return fake_generate(*args, **kwargs)

    return generate


def test_a_grid_stopped_at_any_point_gives_a_smaller_paired_headline(split, tiny_profile, tmp_path):
    """The headline comparison runs first, reference by reference (every scale of one reference for each of its
    models), then the opt-in models: stopped after any job, the rows scored so far are the result, the
    headline compares each pair on the references complete for both, as a grid of just those references
    would, and a rerun ends as an uninterrupted run."""
    whole, refs, _ = grid(split, tiny_profile, tmp_path / "whole", models=WITH_OPT_IN)
    ids = [r.id for r in refs]
    order = list(dict.fromkeys((r["reference"], r["model"]) for r in whole.rows))
    assert order == [(i, m) for i in ids for m in HEADLINE] + [(i, "pretrained") for i in ids]
    assert not whole.stopped and whole.done_references() == ids and whole.progress().startswith("The grid is complete")
    per_reference = 2 * 2  # jobs of the headline comparison per reference: 2 models x 2 scales
    for n_jobs in (0, 3, 4, 9, 12, 14):
        result, _, _ = grid(split, tiny_profile, tmp_path / f"stopped{n_jobs}", models=WITH_OPT_IN,
                            generate=stopped_after(n_jobs))
        assert result.stopped and len(result.rows) == 4 * n_jobs  # a job: 2 prompts x 2 seeds
        same_rows(result.rows, whole.rows[:len(result.rows)])
        done = ids[:min(n_jobs // per_reference, len(ids))]
        assert result.done_references() == done
        assert f"is complete on {len(done)} of 3 references" in result.progress() and "run again" in result.progress()
        for base, n in (("finetuned-vanilla", len(done)), ("pretrained", max(0, n_jobs - 12) // 2)):
            got = matched_gain(result.rows, "finetuned-text-aware", base) if result.rows else None
            alone = [r for r in whole.rows if r["reference"] in ids[:n]]  # a grid of only those references
            want = matched_gain(alone, "finetuned-text-aware", base) if alone else None
            if want is None:
                assert got is None
            else:
                assert got.n_references == n
                np.testing.assert_equal((got.gain, got.low, got.high), (want.gain, want.low, want.high))
        if n_jobs == 3:  # a reference half done: no comparison yet, and the headline says why
            assert "no reference has all of both models' images yet" in headline(result.rows)
    again, _, _ = grid(split, tiny_profile, tmp_path / "stopped9", models=WITH_OPT_IN)
    assert (again.n_resumed, again.n_generated) == (36, 36) and not again.stopped
    same_rows(again.rows, whole.rows)
    assert (tmp_path / "stopped9" / "results.csv").read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()


def test_a_grid_grown_in_a_later_sitting_keeps_every_row_and_makes_only_the_new_ones(split, tiny_profile, tmp_path):
    """A first sitting scores 2 references x (own caption + 1 edit) x 1 scale x 1 seed of 2 models; a second asks
    for more references, edits, scales, seeds and models. Every row of the first is kept, equal by row_key and
    value; only the new images are generated (and the first sitting's last job, which a cut may have left part
    written); results.csv only grows; and the result equals a grid run at the larger size from the start."""
    train, test = split
    few, more = pick_references(test, 2), pick_references(test, 3)
    assert {r.id for r in few} < {r.id for r in more}  # more references add to those of fewer
    few_prompts, more_prompts = build_prompts(few, _grid.EDITS, 1), build_prompts(more, _grid.EDITS, 2)
    assert set(few_prompts) < set(more_prompts)  # and more edits to those a reference had
    bigger = [*HEADLINE, "finetuned-text-aware-no-block", "pretrained"]
    weights = identities(bigger)  # one identity per model throughout: the weights do not change
    settings = dict(train=train, clip=tiny_profile.eval_clip, dino=tiny_profile.dino, segmenter=tiny_profile.segmenter,
                    steps=2, guidance=7.5, progress=False)
    eval_dir = tmp_path / "eval"
    first = run_grid({m: weights[m] for m in HEADLINE}, few, few_prompts, scales=(0.5,), seeds=(0,),
                     out_dir=eval_dir, models=HEADLINE, generate=fake_generate, **settings)
    before = (eval_dir / "results.csv").read_bytes()
    made = []

    def generate(*args, **kwargs):
        out = fake_generate(*args, **kwargs)
        made.extend(row_key(s) for s in out)
        return out

    grown = run_grid(weights, more, more_prompts, scales=(0.5, 1.0), seeds=(0, 1), out_dir=eval_dir, models=bigger,
                     generate=generate, **settings)
    old = {row_key(r) for r in first.rows}
    assert len(grown.rows) == 4 * 3 * 3 * 2 * 2 and (grown.n_resumed, grown.n_generated) == (8, len(grown.rows) - 8)
    # only the new images, and the job of the file's last row again whole (an interruption may have cut it)
    last = row_key(first.rows[-1])
    again = [k for k in old if k[:4] == last[:4]]  # its model, weights, scale and reference: 2 prompts x 1 seed
    assert sorted(made) == sorted([k for k in map(row_key, grown.rows) if k not in old] + again) and len(again) == 2
    kept = {row_key(r): r for r in grown.rows}
    same_rows(first.rows, [kept[row_key(r)] for r in first.rows])  # every old row, the same values
    assert (eval_dir / "results.csv").read_bytes().startswith(before)  # appended to, never rewritten
    fresh = run_grid(weights, more, more_prompts, scales=(0.5, 1.0), seeds=(0, 1), out_dir=tmp_path / "fresh",
                     models=bigger, generate=fake_generate, **settings)
    same_rows(grown.rows, fresh.rows, tolerance=BATCH_TOLERANCE)  # an old image was scored in a smaller batch


def test_a_launchs_process_writes_only_its_share_and_a_lone_rerun_merges_it(split, tiny_profile, tmp_path,
                                                                            monkeypatch):
    """Process 1 of a 2-process launch whose main process died: it makes every other job (round-robin) into its
    own results.rank-1.csv and never touches results.csv. A rerun in one process merges that share, makes only
    the rest and ends with the rows and values of one process's run."""
    whole, _, _ = grid(split, tiny_profile, tmp_path / "whole", models=TWO)
    jobs = [whole.planned[i:i + 4] for i in range(0, len(whole.planned), 4)]  # 2 prompts x 2 seeds per job
    with monkeypatch.context() as m:
        as_process(m, 1, 2)
        grid(split, tiny_profile, tmp_path / "cut", models=TWO)
    assert not (tmp_path / "cut" / "results.csv").exists()
    share = ResultsFile(share_path(tmp_path / "cut", 1)).rows
    assert [row_key(r) for r in share] == [k for job in jobs[1::2] for k in job]
    again, _, _ = grid(split, tiny_profile, tmp_path / "cut", models=TWO)
    assert again.n_resumed == len(share) and again.n_generated == len(whole.rows) - len(share)
    assert again.rows == whole.rows and share_paths(tmp_path / "cut") == []


def test_references_keep_notebook_01s_masks_outputs_are_segmented_once_loaded_and_scored_in_memory(
        tiny_profile, tmp_path, monkeypatch):
    """The grid's subject scores: each reference's stored mask (helpers.data.masks.prepare_masks), each output
    segmented by the same segmenter, loaded once for the whole grid, and scored as it is in memory (its saved JPEG
    would score otherwise). Masks made at another threshold than the outputs' are refused."""
    import helpers.evaluate.metrics as metrics
    from helpers.data.masks import prepare_masks
    from helpers.data.prepare import prepare_dataset
    from helpers.evaluate.metrics import SUBJECT_SCORES, get_segmenter, output_masks, subject_scores
    from helpers.evaluate.results import load_samples

    prep = prepare_dataset(tiny_profile.dataset, tmp_path / "data", resolution=tiny_profile.resolution,
                           test_fraction=tiny_profile.test_fraction, seed=0, progress=False)
    masks = prepare_masks(prep, tiny_profile, progress=False)
    refs = pick_references(prep.test, 2)
    prompts = build_prompts(refs, {"style": ["a watercolor painting of a cartoon character"]}, 1)
    for key in [k for k in metrics._CACHE if k[0] == "segmenter"]:
        monkeypatch.delitem(metrics._CACHE, key)
    loads, real_load = [], metrics.load_segmenter
    monkeypatch.setattr(metrics, "load_segmenter", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    made = []

    def generate(*args, **kwargs):
        out = fake_generate(*args, **kwargs)
        made.extend(out)
        return out

    settings = dict(train=prep.train, clip=tiny_profile.eval_clip, dino=tiny_profile.dino,
                    segmenter=tiny_profile.segmenter, steps=2, guidance=7.5, generate=generate, progress=False)
    result = run_grid(identities(TWO), refs, prompts, scales=(0.5, 1.0), models=list(TWO), masks=masks,
                      mask_threshold=masks.threshold, out_dir=tmp_path / "eval", **settings)
    assert len(result.rows) == 16 and len(loads) == 1  # 8 jobs, one segmenter
    seg = get_segmenter(tiny_profile.segmenter)
    images, ref_images = [s.image for s in made], [{r.id: r.image for r in refs}[s.reference] for s in made]
    out_masks = output_masks(images, [s.prompt for s in made], segmenter=seg, threshold=masks.threshold)
    stored = [masks.image("test", s.reference) for s in made]
    want = subject_scores(images, out_masks, ref_images, stored, clip=tiny_profile.eval_clip, dino=tiny_profile.dino)
    other = subject_scores(images, out_masks, ref_images, [~m for m in stored], clip=tiny_profile.eval_clip,
                           dino=tiny_profile.dino)
    rows = {row_key(r): r for r in result.rows}
    for k, s in enumerate(made):
        row = rows[row_key(s)]
        assert row["subject_coverage"] == out_masks[k].mean() and row["segmenter"] == seg.name
        for name in SUBJECT_SCORES:
            assert row[name] == pytest.approx(float(want[name][k]), abs=1e-6) != float(other[name][k])
    jpegs = load_samples(result.rows, tmp_path / "eval", refs)  # the saved files, read back and scored again
    rescored = subject_scores([s.image for s in jpegs], output_masks([s.image for s in jpegs], [s.prompt for s in jpegs],
                              segmenter=seg, threshold=masks.threshold), [s.reference_image for s in jpegs],
                              [masks.image("test", s.reference) for s in jpegs], clip=tiny_profile.eval_clip,
                              dino=tiny_profile.dino)
    assert any(abs(float(rescored["clip_i_subject"][k]) - r["clip_i_subject"]) > 1e-4 for k, r in enumerate(result.rows))
    with pytest.raises(ValueError, match=r"made by segmenter .* at threshold 0.5, and this evaluation segments its "
                                         r"outputs with .* at 0.6.*notebook 01's mask cell"):
        run_grid(identities(TWO), refs, prompts, scales=(0.5,), models=list(TWO), masks=masks, mask_threshold=0.6,
                 out_dir=None, **settings)
