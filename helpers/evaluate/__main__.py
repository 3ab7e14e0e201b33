"""python -m helpers.evaluate: notebook 05's grid from a terminal, with the same settings (profile, references,
prompts, models, scales, seeds, scorers), written to --out-dir row by row; run it again to resume, or to grow
the grid (more references, --models all, more --scales: the rows already scored are kept).

    python -m helpers.evaluate --profile full [--models all --references N --scales 0.3,0.5 ...]

Then it writes notebook 05's files (summary.csv, headline.txt, headline.csv, tradeoff.png and the other figures)
with the notebook's own writers (helpers.evaluate.outputs), so a model card built from either shows the same.
Ctrl-C stops the grid where it is and writes those files from the rows scored so far.

It holds --out-dir's lock (helpers.support.lock) from start to end: a second command or notebook 05 on the same
folder stops at once. Out of GPU memory: run it again with a smaller --batch-size; it resumes.

On several GPUs, one process each, the processes share the grid's jobs (helpers.evaluate.grid) and end with
the results.csv one process writes; the main process then writes the other files:

    torchrun --nproc_per_node 2 -m helpers.evaluate ...        (or: accelerate launch -m helpers.evaluate ...)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.masks import prepare_masks
from ..data.prepare import use_prepared
from ..profile import get_profile
from ..sample.bank import load_models
from ..sample.registry import parse_models
from ..support import ranks
from ..support.atomic import write_json
from ..support.env import output_root, quiet_libraries
from ..support.lock import FolderLock
from .grid import LOCK_PURPOSE, run_grid
from .outputs import write_evaluation_outputs
from .protocol import copy_baseline, grid_models, grid_settings, protocol
from .stats import EDIT


RESULT_FLAG = "--result-file"  # where the main process writes the grid's counts (helpers.evaluate.launch)


def argument_parser() -> argparse.ArgumentParser:
    """The command's options: notebook 05's Settings cell, one flag each (helpers.evaluate.launch writes them)."""
    ap = argparse.ArgumentParser(prog="python -m helpers.evaluate", description=main.__doc__.split("\n")[0])
    ap.add_argument("--profile", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--quick", action="store_true", help="a quick run (notebook 05's QUICK_RUN): counts cut")
    ap.add_argument("--data-dir", default=None, help="notebook 01's folder (default: <output root>/data)")
    ap.add_argument("--runs-dir", default=None, help="notebook 03's folder (default: <output root>/runs)")
    ap.add_argument("--out-dir", default=None, help="where results.csv goes (default: <output root>/eval)")
    ap.add_argument("--references", type=int, help="held-out references (default: the profile's)")
    ap.add_argument("--eval-minutes", type=float, help="without --references: as many references as fit this many "
                    "T4 minutes (default: the profile's)")
    ap.add_argument("--edits-per-reference", type=int, help="edit prompts per reference (default: the profile's)")
    ap.add_argument("--scales", default="", help="IP-Adapter scales, e.g. 0.3,0.5,0.7,1.0 (default: the profile's)")
    ap.add_argument("--seeds", default="", help="seeds, e.g. 0,1 (default: the profile's)")
    ap.add_argument("--batch-size", type=int, help="images per pipeline call (default: the profile's, else as many "
                    "as fit the GPU); lower it after an out-of-memory error, and rerun: it resumes")
    ap.add_argument("--models", default="", help="the grid's models, comma-separated, or 'all' (default: the headline "
                    "comparison, helpers.evaluate.protocol.GRID_MODELS; notebook 05's EVAL_MODELS)")
    ap.add_argument("--extra-models", default="", help="more adapters, 'name=user/repo, folder' (as in 04 and 05)")
    ap.add_argument(RESULT_FLAG, help=argparse.SUPPRESS)
    return ap


def profile_from_args(args: argparse.Namespace, *, announce: bool = True):
    """The profile the command evaluates with: --profile, --quick, then each setting given (as notebook 05's
    Settings cell builds it from its fields)."""
    return get_profile(args.profile, quick=args.quick, eval_num_references=args.references,
                       eval_minutes=args.eval_minutes, eval_edits_per_reference=args.edits_per_reference,
                       eval_scales=tuple(float(s) for s in args.scales.split(",")) if args.scales.strip() else None,
                       eval_seeds=tuple(int(s) for s in args.seeds.split(",")) if args.seeds.strip() else None,
                       eval_batch_size=args.batch_size,
                       eval_models=tuple(m.strip() for m in args.models.split(",") if m.strip()) or None,
                       announce=announce)


def main(argv=None):
    """python -m helpers.evaluate: notebook 05's grid with the same settings (profile, references, prompts,
    models, scales, seeds, scorers), written to --out-dir row by row; run it again to resume."""
    args = argument_parser().parse_args(argv)
    quiet_libraries()  # the same harmless library noise the notebooks drop
    root = output_root(colab=False, drive=False)
    data_dir, runs_dir, out_dir = (Path(d) if d else root / name for d, name in
                                   ((args.data_dir, "data"), (args.runs_dir, "runs"), (args.out_dir, "eval")))
    profile = profile_from_args(args, announce=ranks.is_main())
    ranks.start()  # under a launch: join its processes (each takes its own GPU) before loading anything
    with FolderLock(out_dir, LOCK_PURPOSE) as lock:  # before minutes of loading: a second writer stops at once
        result = _evaluate(profile, data_dir, runs_dir, out_dir, args.extra_models, lock)
    if args.result_file and ranks.is_main():
        write_json(Path(args.result_file), counts(result))
    return result


def counts(result) -> dict:
    """The numbers of a GridResult that say what this run did (helpers.evaluate.launch reads them back)."""
    return {k: getattr(result, k) for k in ("n_generated", "n_resumed", "n_other", "n_stale", "seconds_generating",
                                            "seconds_scoring", "stopped")}


def _evaluate(profile, data_dir, runs_dir, out_dir, extra_models, lock):
    """The grid and notebook 05's files from it, written to out_dir (whose lock the caller holds and beats).
    Under a launch, every process runs its share of the grid; the main process prepares the data first and
    writes the files."""
    with ranks.main_first():  # data missing: the main process prepares it, the others then read it
        prep = use_prepared(data_dir, profile, progress=False, announce=ranks.is_main())
    references, prompts = protocol(profile, prep)
    masks = prepare_masks(prep, profile, progress=False)  # notebook 01's (made now if it has not run since masks came)
    lock.beat()
    bank = load_models(profile, runs_dir, extra=parse_models(extra_models), baselines=True, verbose=ranks.is_main())
    lock.beat()
    result = run_grid(bank, references, prompts, train=prep.train, out_dir=out_dir, masks=masks,
                      models=grid_models(profile, bank.names), **grid_settings(profile))
    if not ranks.is_main():
        return result
    print(f"{len(result.rows)} images ({result.n_resumed} from an earlier run, {result.n_generated} made now) in "
          f"{result.csv}\n{result.progress()}")
    if not result.rows:
        return result
    copied = copy_baseline(references, prompts, clip=profile.eval_clip)  # the trade-off plot's "reference itself"
    lock.beat()
    written = write_evaluation_outputs(result.rows, out_dir, copy_clip_t=copied[EDIT][0] if EDIT in copied else None,
                                       random_weights=profile.random_weights, prompts=prompts, load=result.samples)
    print(f"{written.headline}\nWrote {', '.join(p.name for p in written.files)} in {out_dir}")
    return result


if __name__ == "__main__":
    from ..support.disk import DiskFull
    from ..support.lock import FolderInUse
    from .grid import EvaluationOutOfMemory
    from .results import ResultsFileError

    try:
        main()
    except (DiskFull, EvaluationOutOfMemory, FolderInUse, ResultsFileError) as e:  # our messages say what to do
        raise SystemExit(f"python -m helpers.evaluate: {e}") from None
