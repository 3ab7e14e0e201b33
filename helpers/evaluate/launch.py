"""Notebook 05's grid on every GPU: `accelerate launch -m helpers.evaluate ...`, started from the cell as a subprocess.

    result = run_grid_on_all_gpus(bank, references, prompts, prep=prep, profile=profile, data_dir=DATA_DIR,
                                  runs_dir=RUNS_DIR, out_dir=EVAL_DIR, models=models, masks=masks)

With one GPU or none it is run_grid in this process, as before. With more, one process per GPU
(helpers.support.launch: why a subprocess and not notebook_launcher) runs the command a terminal would run;
its processes share the grid's jobs and the main one merges their rows into results.csv (helpers.evaluate.grid),
then writes the files a terminal run writes. The cell then reads the grid back from results.csv with
run_grid(make_missing=False), so `result` is what one process would have returned, and the counts (images made,
minutes) come from the launch's main process.

The command carries the notebook's profile by its name and flags (evaluation_args); before anything starts the
profile those flags give must equal the notebook's, field for field, and the references and prompts must be
protocol(profile, prep)'s, which the launched processes compute again: else EvaluationLaunchError says what
would not travel. While it runs, the notebook's model bank moves to the CPU, leaving GPU 0 to the launch.

The stop button stops every process of the launch; the rows they scored are merged and returned, `stopped`
set, as run_grid does in one process. A launch that fails raises EvaluationLaunchError with the command's own
message (out of memory, a full disk, a folder in use: each says what to do) or its last lines.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from ..support.launch import accelerate_command, environment, failure, gpu_count, shown, stream
from .__main__ import RESULT_FLAG, argument_parser, profile_from_args
from .grid import GridResult, run_grid
from .protocol import grid_models, grid_settings, protocol

COMMAND = "python -m helpers.evaluate: "  # how the command's own error lines start (its __main__)


class EvaluationLaunchError(RuntimeError):
    """The grid could not run on every GPU: the message says why and what to do."""


def run_grid_on_all_gpus(bank, references, prompts, *, prep, profile, data_dir, runs_dir, out_dir, models=None,
                         masks=None, extra_models: str = "", gpus: int | None = None, out=None) -> GridResult:
    """notebook 05's grid: run_grid(bank, references, prompts, ...) with the profile's settings, on every GPU.

    prep: notebook 01's split (its training split is refused as references); models: the grid's (default
    grid_models(profile, bank.names)); masks: notebook 01's; extra_models: EXTRA_MODELS, as the bank was loaded
    with it; gpus: default all this machine has. out: where the launch's output goes (default: the cell)."""
    gpus = gpu_count() if gpus is None else gpus
    models = list(grid_models(profile, bank.names) if models is None else models)
    grid = dict(train=prep.train, out_dir=out_dir, models=models, masks=masks, **grid_settings(profile))
    if gpus <= 1:
        return run_grid(bank, references, prompts, **grid)
    args = evaluation_args(profile, data_dir=data_dir, runs_dir=runs_dir, out_dir=out_dir, models=models,
                           extra_models=extra_models)
    check_grid_travels(profile, args, references, prompts, prep)
    out = out or sys.stdout
    device = bank.device
    bank.to("cpu")  # the launch's process on GPU 0 gets the memory the bank held
    _free_gpu_memory()
    try:
        counts = _launch(args, gpus, out)
    finally:
        bank.to(device)
    result = run_grid(bank, references, prompts, progress=False, make_missing=False, **grid)
    if counts is None:  # stopped by hand: what the processes scored is merged; a rerun continues
        return dataclasses.replace(result, n_generated=0, n_resumed=len(result.rows), stopped=True)
    if len(result.rows) != len(result.planned) and not counts["stopped"]:
        raise EvaluationLaunchError(
            f"the launch ended, but results.csv in {out_dir} holds {len(result.rows)} of the grid's "
            f"{len(result.planned)} images: the launched processes evaluated another grid than this notebook's. "
            "Run the grid in this process: run_grid_on_all_gpus(..., gpus=1).")
    return dataclasses.replace(result, **{k: v for k, v in counts.items() if k != "n_other"})


def evaluation_args(profile, *, data_dir, runs_dir, out_dir, models, extra_models: str = "") -> list[str]:
    """The flags of python -m helpers.evaluate that evaluate `profile`'s grid of `models` (notebook 05's
    Settings cell written out) on these folders."""
    args = ["--profile", profile.name, "--data-dir", str(data_dir), "--runs-dir", str(runs_dir),
            "--out-dir", str(out_dir), "--edits-per-reference", str(profile.eval_edits_per_reference),
            "--scales", ",".join(repr(float(s)) for s in profile.eval_scales),
            "--seeds", ",".join(str(int(s)) for s in profile.eval_seeds), "--models", ",".join(models)]
    args += ["--quick"] if profile.quick else []
    args += ["--eval-minutes", repr(float(profile.eval_minutes))]
    args += ["--references", str(profile.eval_num_references)] if profile.eval_num_references is not None else []
    args += ["--batch-size", str(profile.eval_batch_size)] if profile.eval_batch_size is not None else []
    return args + (["--extra-models", extra_models] if extra_models.strip() else [])


def check_grid_travels(profile, args: list[str], references, prompts, prep) -> None:
    """Raise EvaluationLaunchError unless the launched command would evaluate this grid: the profile its flags
    give (resolved afresh, in this environment: $IPA_RESOLUTION and the like are inherited) equals `profile`
    field for field (but the reason it was chosen, and its eval_models: the flags name the models themselves),
    and references and prompts are protocol(profile, prep)'s."""
    theirs = profile_from_args(argument_parser().parse_args(args), announce=False)
    differ = [f"{f.name} {getattr(profile, f.name)!r} here, {getattr(theirs, f.name)!r} there"
              for f in dataclasses.fields(profile) if f.name not in ("reason", "eval_models")
              and getattr(profile, f.name) != getattr(theirs, f.name)]
    if differ:
        raise EvaluationLaunchError(
            f"the launched processes resolve --profile {profile.name} afresh, and these settings of this notebook's "
            f"profile would not travel: {'; '.join(differ)}. Set them in the Settings cell's fields or through the "
            "environment before the notebook starts, or run the grid in this process (gpus=1).")
    want_refs, want_prompts = protocol(profile, prep)
    if ([r.id for r in references] != [r.id for r in want_refs]
            or [(p.reference, p.prompt) for p in prompts] != [(p.reference, p.prompt) for p in want_prompts]):
        raise EvaluationLaunchError(
            "a launch evaluates protocol(profile, prep)'s references and prompts, which its processes compute "
            "again, and these are others: run the grid in this process (gpus=1) for references or prompts of "
            "your own.")


def _launch(args: list[str], gpus: int, out) -> dict | None:
    """Run the command on `gpus` processes, its output into `out`. Returns the main process's counts
    (helpers.evaluate.__main__.counts), or None when it was stopped by hand. Raises EvaluationLaunchError when
    it fails."""
    with tempfile.TemporaryDirectory(prefix="ipa-launch-") as tmp:
        result_file = Path(tmp) / "counts.json"
        cmd = accelerate_command("helpers.evaluate", args + [RESULT_FLAG, str(result_file)], gpus)
        print(f"The grid on {gpus} processes, one per GPU: {shown(cmd[:-2])}", file=out, flush=True)
        try:
            code, tail = stream(cmd, environment(), out)
        except KeyboardInterrupt:
            print("\nStopped: every process of the launch has ended; the rows they scored are merged now.", file=out)
            return None
        if code != 0 or not result_file.is_file():
            raise EvaluationLaunchError(failure(code, tail, f"the grid on {gpus} processes", prefix=COMMAND,
                                                then="Run the cell again: the grid resumes where it stopped."))
        return json.loads(result_file.read_text())


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
