"""helpers.evaluate.results: results.csv refuses what it cannot resume (another version's columns, a second
header line, a damaged line, a repeated row) naming the file, the line and what to do, and a rerun after the
line is fixed ends with the rows of an uninterrupted run."""
import numpy as np
import pytest
from _grid import grid, split  # noqa: F401

from helpers.evaluate.grid import BATCH_TOLERANCE
from helpers.evaluate.results import (
    CSV_COLUMNS,
    KEY_COLUMNS,
    ResultsFile,
    ResultsFileError,
    format_rows,
    merge_shares,
    row_key,
    share_path,
    share_paths,
)
from helpers.sample.registry import MODEL_NAMES
from helpers.support.lock import clean_temporaries

TWO = MODEL_NAMES[:2]


@pytest.fixture(scope="module")
def whole(split, tiny_profile, tmp_path_factory):
    """An uninterrupted grid's results.csv (2 models x 2 scales x 3 references x 2 prompts x 2 seeds)."""
    result, _, _ = grid(split, tiny_profile, tmp_path_factory.mktemp("whole"), models=TWO)
    return result


def lines_of(result):
    return result.csv.read_text().splitlines(keepends=True)


def test_the_identity_is_part_of_every_row_and_its_key(whole):
    assert CSV_COLUMNS[:2] == KEY_COLUMNS[:2] == ("model", "adapter_sha256") and "batch_size" not in KEY_COLUMNS
    assert {r["adapter_sha256"] for r in whole.rows if r["model"] == TWO[0]} == {"a" + "0" * 15}
    assert row_key(whole.rows[0])[1] == whole.rows[0]["adapter_sha256"]


@pytest.mark.parametrize("damage, says", [
    (lambda lines: lines[:5] + [lines[0]] + lines[5:], "line 6: a second header line: two writers"),
    (lambda lines: lines[:5] + [lines[5].replace(",", ";", 3)] + lines[6:], rf"line 6: \d+ fields, not {len(CSV_COLUMNS)}"),
    (lambda lines: lines[:5] + [lines[5].replace(",0,2,", ",x,2,", 1)] + lines[6:], "line 6: seed is 'x', not a number"),
    (lambda lines: lines[:5] + [lines[3]] + lines[5:], "line 6 repeats the image of line 4"),
])
def test_a_bad_line_names_the_file_and_the_line_and_a_rerun_after_fixing_it_ends_the_same(
        whole, split, tiny_profile, tmp_path, damage, says):
    lines = lines_of(whole)
    csv = tmp_path / "results.csv"
    csv.write_text("".join(damage(list(lines))))
    with pytest.raises(ResultsFileError, match=f"{csv}, {says}") as caught:
        grid(split, tiny_profile, tmp_path, models=TWO)
    assert "Delete" in str(caught.value) and "new eval folder" in str(caught.value)
    # what to do: delete the line it names (the repeated row: one of the two), then run again
    number = int(str(caught.value).split(", line ")[1].split(":")[0].split(" ")[0])
    fixed = csv.read_text().splitlines(keepends=True)
    del fixed[number - 1]
    csv.write_text("".join(fixed))
    kept = ResultsFile(csv)
    again, _, _ = grid(split, tiny_profile, tmp_path, models=TWO)
    assert [row_key(r) for r in again.rows] == [row_key(r) for r in whole.rows]
    remade = [i for i, r in enumerate(again.rows) if not kept.has(row_key(r))]
    assert len(remade) <= 1 and [r for i, r in enumerate(again.rows) if i not in remade] == [
        r for i, r in enumerate(whole.rows) if i not in remade]  # the rows kept: exactly
    for i in remade:  # the deleted line's image, made again and scored alone: CLIP on a CPU moves by ~2e-7 with
        for column, value in again.rows[i].items():  # the batch (as across batch sizes, BATCH_TOLERANCE)
            assert value == (pytest.approx(whole.rows[i][column], abs=BATCH_TOLERANCE, rel=0)
                             if isinstance(value, float) else whole.rows[i][column]), column


def test_an_older_results_csv_without_the_adapter_column_is_refused(whole, tmp_path):
    old = [c for c in CSV_COLUMNS if c != "adapter_sha256"]
    rows = [{c: r[c] for c in old} for r in whole.rows[:3]]
    text = ",".join(old) + "\n" + "".join(",".join(str(r[c]) for c in old) + "\n" for r in rows)
    (tmp_path / "results.csv").write_text(text)
    with pytest.raises(ResultsFileError, match="before each row recorded the adapter that made it .adapter_sha256.*"
                                               "Use a new eval folder"):
        ResultsFile(tmp_path / "results.csv")


def test_two_writers_opened_on_one_file_are_caught_when_read(whole, tmp_path):
    """What two unlocked writers did (now run_grid's lock keeps the second out): each appended the same rows."""
    path = tmp_path / "results.csv"
    a, b = ResultsFile(path), ResultsFile(path)
    a.append(whole.rows[:4])
    b.append(whole.rows[:4])
    with pytest.raises(ResultsFileError, match="line 6 repeats the image of line 2"):
        ResultsFile(path)
    assert path.read_text().count("\n") == 9 and format_rows(whole.rows[:1]) in path.read_text()


def test_shares_are_merged_in_the_grids_order_once_and_then_deleted(whole, tmp_path):
    """results.rank-K.csv of two processes (each every other job, the second cut in the middle of its last line)
    into results.csv: its rows in the order given, each once, the shares gone; the keys of each file's last row
    (whose job a rerun makes again whole) come back."""
    rows = whole.rows
    ResultsFile(tmp_path / "results.csv").append(rows[:4])
    shares = [share_path(tmp_path, k) for k in (0, 1)]
    ResultsFile(shares[0]).append(rows[2:4] + rows[8:12])  # rows 2, 3 are in results.csv already
    ResultsFile(shares[1]).append(rows[4:8] + rows[12:14])
    shares[1].write_text(shares[1].read_text()[:-20])  # row 13 cut short
    assert clean_temporaries(tmp_path) == [] and share_paths(tmp_path) == shares  # the lock's clean-up keeps them
    results = ResultsFile(tmp_path / "results.csv")
    last = merge_shares(results, [row_key(r) for r in rows])
    assert last == {row_key(rows[3]), row_key(rows[11]), row_key(rows[12])}
    assert ResultsFile(tmp_path / "results.csv").rows == results.rows == rows[:13]
    assert share_paths(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    # a share whose rows are all there already (a crash after the merge, before the deletion) adds nothing
    ResultsFile(shares[0]).append(rows[8:12])
    before = (tmp_path / "results.csv").read_bytes()
    merge_shares(ResultsFile(tmp_path / "results.csv"))
    assert (tmp_path / "results.csv").read_bytes() == before and share_paths(tmp_path) == []
    # a share scored with another CLIP does not mix
    ResultsFile(shares[1]).append([dict(r, clip_model="another/clip") for r in rows[20:21]])
    with pytest.raises(ResultsFileError, match="scored with CLIP"):
        merge_shares(ResultsFile(tmp_path / "results.csv"), clip_model=rows[0]["clip_model"])


def test_an_older_results_csv_without_the_subject_scores_is_refused_and_nan_round_trips(whole, tmp_path):
    from helpers.evaluate.stats import SUBJECT_SCORES

    old = [c for c in CSV_COLUMNS if c not in (*SUBJECT_SCORES, "subject_coverage", "segmenter", "mask_threshold")]
    text = ",".join(old) + "\n" + "".join(",".join(str(r[c]) for c in old) + "\n" for r in whole.rows[:3])
    (tmp_path / "results.csv").write_text(text)
    with pytest.raises(ResultsFileError, match="written before the subject-only scores .clip_i_subject.*saved JPEGs.*"
                                               "Use a new eval folder"):
        ResultsFile(tmp_path / "results.csv")
    empty = dict(whole.rows[0], clip_i_subject=float("nan"), dino_subject=float("nan"))  # an empty mask's row
    ResultsFile(tmp_path / "new.csv").append([empty])
    back = ResultsFile(tmp_path / "new.csv").rows[0]
    assert np.isnan(back["clip_i_subject"]) and np.isnan(back["dino_subject"])
    assert {k: v for k, v in back.items() if k not in SUBJECT_SCORES[:2]} == {
        k: v for k, v in whole.rows[0].items() if k not in SUBJECT_SCORES[:2]}
    assert ",nan,nan," in (tmp_path / "new.csv").read_text()
