"""Generate and score the evaluation grid, one row per image, written as it goes (notebook 05, helpers.evaluate.protocol).

    result = run_grid(bank, references, prompts, train=prep.train, out_dir=EVAL_DIR, **grid_settings(profile))
    result.rows          # one dict per image (helpers.evaluate.results.CSV_COLUMNS), in grid order
    result.samples(rows) # those images as helpers.sample.generate.Sample objects (read back from out_dir)

The grid is models x IP-Adapter scales x references x prompts x seeds. Each reference's prompts x seeds,
at one model and scale, is one job: generated (helpers.sample.generate.generate, one torch.Generator per image),
saved, scored (helpers.evaluate.metrics: CLIP-T, CLIP-I, DINO, and the same on the character alone and on the
background alone) and appended to results.csv before the next job.
A rerun skips the jobs already in results.csv and runs the others exactly as an uninterrupted run would
(the same jobs, so the same batches), so its final CSV is the same, row for row and value for value.

Scoring (helpers.evaluate.scoring, the subject-only scores included) happens before the JPEG is written: the saved
file, read back, would score slightly differently. The result is a helpers.evaluate.grid_result.GridResult.

A grid that grows across sittings:
- The headline comparison comes first, reference by reference: every scale of one reference for each model of
  the headline comparison (helpers.evaluate.protocol.GRID_MODELS among the grid's models), then the next
  reference; the other models follow in the same order. Stopped at any point (an interrupt, Ctrl-C: run_grid
  returns the rows scored so far, `result.stopped`; or a disconnect, after which a rerun resumes), the grid
  holds whole references of the headline comparison, and the headline uses those (stats.complete_references).
- Rows are keyed (results.row_key), so a rerun with more references, models, scales, prompts or seeds keeps
  every row already scored and makes only the new ones (a job held in part gets its missing images alone;
  the job of results.csv's last row, which a cut may have left part written, is made again whole, its rows
  kept). `result.progress()` says how far the grid got.

What makes it safe to stop and run again:
- Rows know their adapter: every row carries the identity of the weights that made it (adapter_sha256, the
  bank's helpers.sample.registry.adapter_sha256 of the model's file). A model retrained since (a new file in
  its run folder) has a new identity: its old rows are out of date, said so, and made again; they stay in the
  append-only file but never reach `rows`, the summary, the headline or the model card.
- One writer per eval folder: run_grid holds out_dir's helpers.support.lock.FolderLock ("evaluation") while it
  writes, beating at each job; a second notebook or command on the same folder stops at once (FolderInUse).
- Images are written atomically (helpers.support.atomic.replacing); results.csv is append-only, a cut last
  line dropped; a full disk raises helpers.support.disk.DiskFull naming the file.
- Several processes (torchrun / accelerate launch, one per GPU; helpers.support.ranks): the jobs still to do are
  dealt out round-robin, each process runs its own (the same batches, so the same images, as one process makes)
  and appends their rows to its own share, results.rank-K.csv; at the end the main process merges the shares
  into results.csv in the grid's order, in one atomic rewrite (helpers.evaluate.results.merge_shares), so the
  file equals a one-process run's, row for row. The launch holds one lock (its ranks share it); shares are not
  hidden temporaries, so the lock's clean-up never deletes them. A launch killed part way leaves its shares:
  the next run, with any number of processes, merges them first and skips what they hold. In memory (out_dir
  None) nothing is shared: every process makes the whole grid.
- Out of GPU memory: EvaluationOutOfMemory names the batch size (notebook 05's EVAL_BATCH_SIZE, the command's
  --batch-size), which may change on resume. The batch is not part of a row's key, as an image depends on its
  seed, not its batch: rows made at another batch size agree within BATCH_TOLERANCE (floating-point rounding).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.masks import DEFAULT_THRESHOLD
from ..profile import CLIPSEG, DINO, EVAL_CLIP
from ..sample.generate import MAX_BATCH, OutOfMemory, as_list, out_of_memory_advice
from ..sample.generate import generate as generate_images
from ..sample.references import Reference
from ..sample.saved import sample_filename
from ..support import ranks
from ..support.atomic import replacing
from ..support.lock import FolderLock
from .grid_result import GridResult
from .metrics import get_clip, get_dino, get_segmenter
from .protocol import GRID_MODELS, PromptSpec, check_held_out
from .results import IDENTITY, RESULTS_FILE, ResultsFile, merge_shares, row_key, share_path
from .scoring import make_reference_masks, score_samples

LOCK_PURPOSE = "evaluation"  # what the eval folder's lock says its writer is
BATCH_KNOB = ("set EVAL_BATCH_SIZE = {k} in notebook 05's Settings cell, or give python -m helpers.evaluate "
              "--batch-size {k}")
# How far a row's scores may move when only the batch size changes (resuming after an out-of-memory error at a
# smaller batch): plain cosines, absolute. Measured on the tiny profile on a CPU, batch 1 against 3: pixels move by
# at most 2 of 255, scores by at most 5e-5 (252 images, 7 models); tests/evaluate/test_grid.py checks it. Not
# measured on a GPU in fp16, whose rounding is coarser.
BATCH_TOLERANCE = 1e-3


class EvaluationOutOfMemory(OutOfMemory):
    """The GPU ran out of memory during the evaluation's generation; the message names EVAL_BATCH_SIZE /
    --batch-size and says that it may be changed on resume."""




def headline_first(models) -> list[str]:
    """The models the grid generates first, reference by reference: those of the headline comparison
    (GRID_MODELS) among `models`, or all of them when it has none."""
    return [m for m in models if m in GRID_MODELS] or list(models)


def _grid_jobs(models, identities, scales, references, prompts, seeds, steps, guidance):
    """The grid in generation order, one unit per job: (model, scale, reference, [row keys of its prompts x
    seeds]). Reference-major, the headline comparison first: for each reference, every scale of
    each headline_first model; then the other models the same way."""
    by_ref = {r.id: [p.prompt for p in prompts if p.reference == r.id] for r in references}
    first = headline_first(models)
    for group in (first, [m for m in models if m not in first]):
        for r in references:
            for m in group:
                for s in scales:
                    keys = [(m, identities[m], float(s), r.id, p, int(seed), int(steps), float(guidance))
                            for p in by_ref[r.id] for seed in seeds]
                    if keys:
                        yield m, float(s), r, keys


def _products(keys: list[tuple]) -> list[tuple[list[str], list[int]]]:
    """The row keys of one job (one model, scale and reference) as few (prompts, seeds) products as cover them,
    for generate, which makes prompts x seeds: the seeds grouped by the prompts each lacks. All of a job's
    keys are one product; a grid grown by prompts and seeds needs two."""
    by_seed: dict[int, list[str]] = {}
    for k in keys:
        by_seed.setdefault(k[5], []).append(k[4])
    groups: dict[tuple, list[int]] = {}
    for seed, prompts in by_seed.items():
        groups.setdefault(tuple(prompts), []).append(seed)
    return [(list(prompts), seeds) for prompts, seeds in groups.items()]


def run_grid(bank, references: Sequence[Reference], prompts: Sequence[PromptSpec], *, train, scales, seeds=(0,),
             models=None, out_dir=None, clip=EVAL_CLIP, dino=DINO, masks=None, segmenter=CLIPSEG,
             mask_threshold: float = DEFAULT_THRESHOLD, steps=None, guidance=None, batch_size=None, progress=True,
             generate=None, make_missing: bool = True) -> GridResult:
    """Generate every model x scale x reference x prompt x seed and score each image, writing as it goes.

    train:    the training split: references found in it are refused (check_held_out) before anything runs
    bank:     helpers.sample.bank.load_models(...); models: names to evaluate (default: all the bank has). With a
              stand-in `generate`, also {model name: adapter identity} (the stand-in sets Sample.adapter_sha256)
    out_dir:  where results.csv and images/ go (None: write nothing). Each reference's prompts x seeds, at
              one model and scale, are generated in one job, scored, saved and appended to results.csv
              (flushed and fsynced) before the next; a rerun with the same out_dir skips every row already
              there and ends with the same rows and values as a run that was never interrupted. Rows of a
              model's earlier adapter (another adapter_sha256) count as missing: they are made again. The
              folder's lock (helpers.support.lock.FolderLock) is held throughout: another writer -> FolderInUse
    masks:    the references' masks: notebook 01's (helpers.data.masks.prepare_masks(prep, profile)), or None to
              segment them here (make_reference_masks); segmenter, mask_threshold: what segments each output
              (profile.segmenter, profile.mask_threshold: grid_settings), the masks' own
    steps, guidance: default to the bank's profile (num_inference_steps, guidance_scale)
    batch_size: images per pipeline call (default: helpers.sample.generate.pick_batch_size); out of GPU memory ->
              EvaluationOutOfMemory, and a rerun at a smaller one resumes (rows within BATCH_TOLERANCE)
    generate: the generation function (default helpers.sample.generate.generate; tests pass a stand-in)
    make_missing: False: make nothing, only merge the shares a launch left and return the rows out_dir holds
              (helpers.evaluate.launch reads a launch's grid back this way)

    Order: the headline comparison first, reference by reference (_grid_jobs). An interrupt (KeyboardInterrupt:
    Colab's stop button, Ctrl-C) ends the grid where it is: the result holds the rows scored so far
    (result.stopped; result.progress() says how far), and a rerun continues. Under a launch of several
    processes (WORLD_SIZE > 1) with an out_dir, the jobs are shared out (module docstring) and every process
    returns the same result, read from the merged results.csv; an interrupt there stops the launch (it is raised),
    and the next run merges what each process wrote.
    """
    references = list(references)
    _check_inputs(references, prompts, train)
    steps, guidance = _steps_and_guidance(bank, steps, guidance)
    models = list(getattr(bank, "names", bank) if models is None else as_list(models))
    identities = {m: _identity(bank, m) for m in models}
    out_dir = Path(out_dir) if out_dir is not None else None
    split = out_dir is not None and ranks.world_size() > 1  # a launch's processes share the jobs
    say = print if ranks.is_main() and make_missing else _silent
    with FolderLock(out_dir, LOCK_PURPOSE) if out_dir is not None else contextlib.nullcontext() as lock:
        clip_s, dino_s = get_clip(clip), get_dino(dino)  # loaded once per process (a first download takes a while)
        seg = get_segmenter(segmenter)
        ref_masks = make_reference_masks(references, masks, segmenter=seg, threshold=mask_threshold)
        if lock is not None:
            lock.beat()
        jobs = list(_grid_jobs(models, identities, scales, references, prompts, seeds, steps, guidance))
        planned = [k for *_, keys in jobs for k in keys]
        checks = dict(clip_model=clip_s.name, dino_model=dino_s.name, segmenter=seg.name, mask_threshold=mask_threshold)
        results, last_keys = _open_results(out_dir, planned, checks, split, say)
        n_stale = _say_stale(results, planned, identities, say)
        resumed = sum(results.has(k) for k in planned)
        if resumed:
            say(f"Resuming: {resumed} of {len(planned)} images are already in {results.path}")
        todo = [job for job in jobs if make_missing and not all(results.has(k) for k in job[3])]
        mine = ranks.my_share(todo) if split else todo
        if split:
            say(f"{len(todo)} jobs (model x scale x reference) to do, shared by {ranks.world_size()} processes; "
                f"each writes its rows to its own {share_path(out_dir, 0).name.replace('-0.', '-K.')}, merged into "
                f"{RESULTS_FILE} at the end")
        bar = None
        if progress and make_missing and ranks.is_main():
            from tqdm.auto import tqdm

            bar = (tqdm(total=sum(len(keys) for *_, keys in mine), desc="generating + scoring (process 0's share)",
                        unit="img") if split else
                   tqdm(total=len(planned), initial=resumed, desc="generating + scoring", unit="img"))
        writer = ResultsFile(share_path(out_dir, ranks.rank()), **checks) if split else results
        grid = _Grid(bank, references, prompts, results, out_dir, tuple(seeds), steps, guidance, batch_size,
                     generate or generate_images, clip_s, dino_s, seg, float(mask_threshold), ref_masks,
                     writer=writer, last_keys=last_keys)
        stopped = False
        try:
            for model, scale, ref, keys in mine:
                if lock is not None:
                    lock.beat()
                n = grid.run_job(model, scale, ref, keys)
                if bar is not None:
                    bar.update(n)
        except KeyboardInterrupt:  # stopped by hand: what is scored stays scored, and is the result
            if split:  # every process of the launch stops; the next run merges their shares
                raise
            stopped = True
        finally:
            if bar is not None:
                bar.close()
        if split:  # the shares into results.csv, in the grid's order, by the main process; then all read it
            ranks.wait_for_everyone()
            if ranks.is_main():
                merge_shares(results, planned, **checks)
            ranks.wait_for_everyone()
            results = ResultsFile(results.path)
    by_key = {row_key(r): r for r in results.rows}
    rows = [by_key[k] for k in planned if k in by_key]
    return GridResult(rows, results.path, len(rows) - resumed, resumed, len(results.rows) - len(rows),
                      grid.seconds_generating, grid.seconds_scoring, out_dir, references, grid.images, n_stale,
                      planned, headline_first(models), stopped)


def _identity(bank, model: str) -> str:
    """The identity of `model`'s weights: ModelBank.adapter_sha256, or a stand-in's {name: identity}."""
    if hasattr(bank, "adapter_sha256"):
        return str(bank.adapter_sha256(model))
    if isinstance(bank, Mapping):
        return str(bank[model])
    raise TypeError(f"cannot tell which weights model {model!r} has: give a helpers.sample.bank.ModelBank, or "
                    f"(with a stand-in generate) {{model name: adapter identity}}, not {type(bank).__name__}")


def _silent(*args, **kwargs) -> None:
    """print for the processes of a launch but the main one (which alone speaks)."""


def _open_results(out_dir, planned, checks: dict, split, say) -> tuple[ResultsFile, set]:
    """results.csv with every share merged into it (results.merge_shares: the shares a killed launch left, in the
    grid's order `planned`), and the keys whose job is made again whole. Under a launch (split) the main process
    merges while the others wait, after every process holds the lock (its clean-up of temporaries done). checks:
    the scorers' names a ResultsFile refuses to mix (clip_model, dino_model, segmenter, mask_threshold)."""
    path = out_dir / RESULTS_FILE if out_dir is not None else None
    if split:
        ranks.wait_for_everyone()
    last: set = set()
    if not split or ranks.is_main():
        results = ResultsFile(path, **checks)
        if results.dropped_partial_line:
            say(f"{results.path}: dropped a last line cut short by an interruption")
        before = len(results.rows)
        last = merge_shares(results, planned, **checks)
        if len(results.rows) > before:
            say(f"{results.path}: merged {len(results.rows) - before} rows that processes of an earlier launch had "
                "written to their own shares")
    if split:
        last = ranks.from_main(last)  # also waits for the merge
        if not ranks.is_main():
            results = ResultsFile(path, **checks)
    return results, last


def _say_stale(results: ResultsFile, planned: list[tuple], identities: dict[str, str], say=print) -> int:
    """Print, per model, how many of its rows were made by an earlier adapter (another identity) and are missing
    for the current one: they are regenerated. Returns how many there are."""
    wanted = {k[:1] + k[2:] for k in planned if not results.has(k)}  # the missing keys, identity left out
    old = Counter((r["model"], r[IDENTITY]) for r in results.rows
                  if r["model"] in identities and r[IDENTITY] != identities[r["model"]]
                  and row_key(r)[:1] + row_key(r)[2:] in wanted)
    for model in identities:
        ids = {i: n for (m, i), n in old.items() if m == model}
        if ids:
            say(f"model {model}: {sum(ids.values())} rows of an earlier adapter (id {', '.join(ids)}) are out of "
                f"date; regenerating with id {identities[model]}")
    return sum(old.values())


def _check_inputs(references, prompts, train) -> None:
    """Refuse training images as references (check_held_out), and prompts for references not given."""
    check_held_out(references, train)
    stray = sorted({p.reference for p in prompts} - {r.id for r in references})
    if stray:
        raise KeyError(f"prompts refer to unknown references {stray}")


def _steps_and_guidance(bank, steps, guidance) -> tuple[int, float]:
    profile = getattr(bank, "profile", None)
    if profile is None and (steps is None or guidance is None):
        raise ValueError("give steps and guidance (the bank has no profile to take them from)")
    return int(steps or profile.num_inference_steps), float(profile.guidance_scale if guidance is None else guidance)


@dataclass
class _Grid:
    """What every job of one run_grid call shares."""

    bank: object
    references: list
    prompts: Sequence[PromptSpec]
    results: ResultsFile
    out_dir: Path | None
    seeds: tuple
    steps: int
    guidance: float
    batch_size: int | None
    generate: object
    clip: object
    dino: object
    segmenter: object
    mask_threshold: float
    reference_masks: dict  # reference id -> bool [H, W]
    writer: ResultsFile | None = None  # where this process appends its rows: results, or its share under a launch
    last_keys: set = field(default_factory=set)  # results.csv's and each share's last row when this run started
    images: dict = field(default_factory=dict)  # row key -> PIL image, when there is no out_dir
    seconds_generating: float = 0.0
    seconds_scoring: float = 0.0

    def run_job(self, model: str, scale: float, ref: Reference, keys: list[tuple]) -> int:
        """One job: generate the images of one reference's prompts x seeds at one model and scale that
        results.csv lacks, save them (or keep them in `images`), score them and append their rows to results.csv
        (to this process's share under a launch). Returns how many were made. A job that results.csv holds in
        part (the grid grew by prompts or seeds) is completed with its missing images alone, except the job of
        the file's last row (or a share's), which an interruption may have cut short: it is made again whole
        (its rows there are kept), in the batches an uninterrupted run makes, so the CSV ends the same byte for
        byte."""
        missing = keys if self.last_keys & set(keys) else [k for k in keys if not self.results.has(k)]
        start = time.perf_counter()
        made = []
        for prompts, seeds in _products(missing):  # one call when nothing of the job is there yet
            made += self._generate(model, scale, ref, prompts, seeds,
                                   [k for p in prompts for seed in seeds for k in missing if k[4:6] == (p, seed)])
        self.seconds_generating += time.perf_counter() - start
        n_new = sum(not self.results.has(row_key(s)) for s in made)
        start = time.perf_counter()
        files = None
        if self.out_dir is not None:
            files = [f"images/{sample_filename(s, '.jpg')}" for s in made]
            for s, f in zip(made, files):
                with replacing(self.out_dir / f) as tmp:  # whole or absent, never half a JPEG
                    s.image.convert("RGB").save(tmp, format="JPEG", quality=95)
        else:
            self.images.update((row_key(s), s.image) for s in made)
        rows = score_samples(made, self.references, self.prompts, clip=self.clip, dino=self.dino, files=files,
                             segmenter=self.segmenter, threshold=self.mask_threshold,
                             reference_masks=self.reference_masks)
        (self.writer or self.results).append([r for r in rows if not self.results.has(row_key(r))])
        self.seconds_scoring += time.perf_counter() - start
        return n_new

    def _generate(self, model: str, scale: float, ref: Reference, prompts: list[str], seeds: list[int],
                  keys: list[tuple]) -> list:
        """generate `prompts` x `seeds` of one reference at one model and scale, checked to be the images of
        `keys` (row keys, in generation order)."""
        try:
            made = self.generate(self.bank, {ref.id: ref.image}, {ref.id: prompts}, models=[model],
                                 scales=(scale,), seeds=tuple(seeds), steps=self.steps, guidance=self.guidance,
                                 batch_size=self.batch_size,
                                 concepts={p.prompt: p.concept for p in self.prompts if p.reference == ref.id},
                                 progress=False)
        except (OutOfMemory, torch.cuda.OutOfMemoryError) as e:
            raise self._out_of_memory(e, model, scale, ref) from None
        got = [row_key(s) for s in made]
        if got != keys:
            i = next(i for i in range(max(len(got), len(keys))) if got[i:i + 1] != keys[i:i + 1])
            raise RuntimeError(f"the generator returned other images than asked for ({model}, scale {scale}, "
                               f"{ref.id}): {got[i:i + 1] or 'nothing'} where {keys[i:i + 1] or 'nothing'} was "
                               "asked for (row_key: model, adapter identity, scale, reference, prompt, seed, steps, "
                               "guidance)")
        return made

    def _out_of_memory(self, error, model: str, scale: float, ref: Reference) -> EvaluationOutOfMemory:
        """The evaluation's out-of-memory error: where it happened, the batch size to lower and that a rerun
        resumes."""
        n = getattr(error, "batch_size", None) or self.batch_size or min(MAX_BATCH, len(self.seeds) * len(
            [p for p in self.prompts if p.reference == ref.id]))
        done = len(self.results.rows)
        return EvaluationOutOfMemory(
            f"Out of GPU memory generating {model} at IP scale {scale:g} for reference {ref.id} ({n} images per "
            f"pipeline call). " + out_of_memory_advice(n, BATCH_KNOB) + " It can be changed on resume: run the "
            f"evaluation again and it continues where it stopped ({done} rows are in "
            f"{self.results.path or 'memory'}); rows made at another batch size agree within "
            f"{BATCH_TOLERANCE:g} (plain cosine), the batch is not part of a row's key.", n)
