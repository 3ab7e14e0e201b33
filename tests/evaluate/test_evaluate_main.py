"""python -m helpers.evaluate under a launch of two processes (torchrun, two CPU processes with gloo standing in
for two GPUs): the processes share the grid's jobs and end with the rows of one process, also after a launch
killed half way and resumed by one process."""
from pathlib import Path

import pytest
from _launch import one_test_part, torchrun

from helpers.evaluate.__main__ import main as evaluation_main
from helpers.evaluate.results import RESULTS_FILE, ResultsFile, row_key, share_paths

# the smallest grid that still shares out: 2 references x (own caption + 1 edit) x 1 scale x 2 models: 4 jobs
GRID = ["--profile", "tiny", "--references", "2", "--edits-per-reference", "1", "--scales", "1.0",
        "--models", "finetuned-text-aware,finetuned-vanilla"]


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory):
    """The grid as one process makes it (this one), the arguments, and the folder the launches write beside it."""
    root = tmp_path_factory.mktemp("evaluate")
    args = GRID + ["--data-dir", str(root / "data"), "--runs-dir", str(runs[0])]
    evaluation_main(args + ["--out-dir", str(root / "one")])
    return root, args, ResultsFile(root / "one" / RESULTS_FILE).rows


@one_test_part
def test_two_processes_end_with_the_rows_of_one(one_process):
    root, args, rows = one_process
    out = torchrun("-m", "helpers.evaluate", *args, "--out-dir", root / "two").stdout
    assert "4 jobs (model x scale x reference) to do, shared by 2 processes" in out
    assert len(rows) == 8 and len({row_key(r) for r in rows}) == 8
    # row for row and value for value (ResultsFile refuses a repeated row): the same bytes
    assert ResultsFile(root / "two" / RESULTS_FILE).rows == rows
    assert (root / "two" / RESULTS_FILE).read_bytes() == (root / "one" / RESULTS_FILE).read_bytes()
    assert (root / "two" / "summary.csv").read_bytes() == (root / "one" / "summary.csv").read_bytes()
    assert share_paths(root / "two") == [] and not list((root / "two").glob(".*"))  # no share, temporary or lock


@one_test_part
def test_a_launch_killed_half_way_and_resumed_by_one_process_ends_the_same(one_process, capsys):
    """Each process is killed (SIGKILL) as it starts its second job: process 0 has written its first job's rows
    to its share, process 1 its own or part of it or nothing (torchrun ends it once process 0 dies). One process
    then merges the shares, skips their rows and makes the rest."""
    root, args, rows = one_process
    cut = root / "cut"
    killed = torchrun(Path(__file__).with_name("_evaluate_launch.py"), *args, "--out-dir", cut, check=False,
                      IPA_TEST_KILL_AT="2")
    assert killed.returncode != 0 and not (cut / RESULTS_FILE).exists()
    left = {row_key(r) for share in share_paths(cut) for r in ResultsFile(share).rows}
    assert 2 <= len(left) <= 4 and left < {row_key(r) for r in rows}
    capsys.readouterr()
    resumed = evaluation_main(args + ["--out-dir", str(cut)])
    said = capsys.readouterr().out
    assert f"merged {len(left)} rows" in said and f"Resuming: {len(left)} of 8 images" in said
    assert resumed.n_resumed == len(left) and resumed.n_generated == 8 - len(left)
    assert resumed.rows == rows  # every row, equal in value, in the grid's order
    in_file = ResultsFile(cut / RESULTS_FILE).rows  # no row twice (it would raise)
    assert sorted(map(row_key, in_file)) == sorted(map(row_key, rows)) and share_paths(cut) == []


def notebook_05(root, args, profile=None):
    """What notebook 05 holds when its grid cell runs: the profile its Settings cell built (GRID's flags), notebook
    01's split and masks, the references and prompts of protocol, the bank with its baselines."""
    from helpers.data.masks import prepare_masks
    from helpers.data.prepare import use_prepared
    from helpers.evaluate.__main__ import argument_parser, profile_from_args
    from helpers.evaluate.protocol import protocol
    from helpers.sample.bank import load_models

    parsed = argument_parser().parse_args(args)
    profile = profile or profile_from_args(parsed, announce=False)
    prep = use_prepared(root / "data", profile, progress=False, announce=False)
    references, prompts = protocol(profile, prep)
    bank = load_models(profile, parsed.runs_dir, baselines=True, verbose=False)
    return dict(bank=bank, references=references, prompts=prompts, prep=prep, profile=profile,
                data_dir=root / "data", runs_dir=parsed.runs_dir, masks=prepare_masks(prep, profile, progress=False))


@one_test_part
def test_notebook_05_s_launch_on_two_processes_ends_with_the_rows_and_files_of_one(one_process):
    """run_grid_on_all_gpus as notebook 05 calls it, on 2 "GPUs": accelerate launch -m helpers.evaluate as a
    subprocess (two CPU processes, gloo), read back into the result one process returns."""
    import io

    from helpers.evaluate.launch import run_grid_on_all_gpus

    root, args, rows = one_process
    held = notebook_05(root, args)
    bank = held.pop("bank")
    out = io.StringIO()
    result = run_grid_on_all_gpus(bank, held.pop("references"), held.pop("prompts"), out_dir=root / "launched",
                                  gpus=2, out=out, **held)
    printed = out.getvalue()
    assert "The grid on 2 processes, one per GPU: accelerate launch --multi_gpu --num_processes 2" in printed
    assert "4 jobs (model x scale x reference) to do, shared by 2 processes" in printed
    assert result.rows == rows and result.complete and not result.stopped
    assert (result.n_generated, result.n_resumed) == (8, 0)  # the launch's counts, not the read-back's
    assert (root / "launched" / RESULTS_FILE).read_bytes() == (root / "one" / RESULTS_FILE).read_bytes()
    assert (root / "launched" / "summary.csv").read_bytes() == (root / "one" / "summary.csv").read_bytes()
    assert bank.device.type == "cpu" and bank.active is not None  # the bank is back, its model in the pipeline


def test_a_stopped_launch_returns_the_rows_its_processes_scored(one_process, monkeypatch):
    """The stop button during the launch: its processes end (helpers.support.launch.stream stops them) leaving
    their shares; the cell merges them and returns those rows, stopped, as run_grid does in one process."""
    import helpers.evaluate.launch as launch_module
    from helpers.evaluate.launch import run_grid_on_all_gpus

    root, args, rows = one_process
    out_dir = root / "stopped"
    lines = (root / "one" / RESULTS_FILE).read_text().splitlines(keepends=True)

    def stopped_after_two_images(cmd, env, out):  # process 1 had scored 2 images of its share
        out_dir.mkdir()
        share_path = out_dir / "results.rank-1.csv"
        share_path.write_text("".join(lines[:1] + lines[3:5]))
        raise KeyboardInterrupt

    monkeypatch.setattr(launch_module, "stream", stopped_after_two_images)
    held = notebook_05(root, args)
    result = run_grid_on_all_gpus(held.pop("bank"), held.pop("references"), held.pop("prompts"), out_dir=out_dir,
                                  gpus=2, **held)
    assert result.stopped and result.rows == rows[2:4] and share_paths(out_dir) == []
    assert ResultsFile(out_dir / RESULTS_FILE).rows == rows[2:4]
    assert "run again to continue" in result.progress()


def test_settings_that_would_not_reach_the_launched_processes_are_refused_before_anything_starts(
        one_process, monkeypatch):
    import subprocess

    from helpers.evaluate.launch import EvaluationLaunchError, run_grid_on_all_gpus

    def no_process(*a, **kw):
        raise AssertionError("nothing may start")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    root, args, _ = one_process
    held = notebook_05(root, args)
    changed = held["profile"].replace(guidance_scale=3.0)  # not a field of notebook 05's Settings cell
    with pytest.raises(EvaluationLaunchError, match=r"would not travel: guidance_scale 3\.0 here, 7\.5 there\."):
        run_grid_on_all_gpus(held["bank"], held["references"], held["prompts"], out_dir=root / "x", gpus=2,
                             **{**{k: v for k, v in held.items() if k not in ("bank", "references", "prompts")},
                                "profile": changed})
    with pytest.raises(EvaluationLaunchError, match="references and prompts, which its processes compute again"):
        run_grid_on_all_gpus(held.pop("bank"), held.pop("references")[:1], held.pop("prompts"), out_dir=root / "x",
                             gpus=2, **held)
    assert not (root / "x").exists()


def test_a_launch_that_fails_raises_the_command_s_own_message_and_gives_the_bank_back(one_process, monkeypatch):
    import helpers.evaluate.launch as launch_module
    from helpers.evaluate.launch import EvaluationLaunchError, run_grid_on_all_gpus

    said = ("python -m helpers.evaluate: the GPU ran out of memory at 8 images per call: set EVAL_BATCH_SIZE = 4 in "
            "notebook 05's Settings cell, and run again: it resumes")
    monkeypatch.setattr(launch_module, "stream", lambda cmd, env, out: (1, f"generating: 10%\r\n{said}\n[rank1]: ..."))
    root, args, _ = one_process
    held = notebook_05(root, args)
    bank = held.pop("bank")
    moved = []
    monkeypatch.setattr(bank, "to", lambda device: moved.append(str(device)) or bank)
    with pytest.raises(EvaluationLaunchError) as failed:
        run_grid_on_all_gpus(bank, held.pop("references"), held.pop("prompts"), out_dir=root / "failed", gpus=2, **held)
    assert str(failed.value) == said.removeprefix("python -m helpers.evaluate: ") + " (the grid on 2 processes)"
    assert moved == ["cpu", "cpu"]  # to the CPU for the launch, and back to where it was (here: the CPU)
