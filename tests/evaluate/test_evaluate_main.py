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
