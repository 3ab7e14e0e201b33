"""helpers.evaluate.outputs: notebook 05's files have one writer. `python -m helpers.evaluate` writes the same
summary.csv, headline files and figures as notebook 05's cells do on the same rows, whatever the notebook's
matplotlib settings, and a model card built from a command-line evaluation shows the trade-off plot."""
import ast
import json
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pandas as pd
from _rows import synthetic_rows
from PIL import Image

from helpers.data.masks import MASKS_FILE
from helpers.data.prepare import use_prepared
from helpers.evaluate.__main__ import main as evaluation_main
from helpers.evaluate.outputs import (
    ADAPTERS_COLUMN,
    ADAPTERS_LINE,
    HEADLINE_DRAWS_FILE,
    HEADLINE_FILE,
    HEADLINE_TABLE_FILE,
    SCALE_SWEEP_FILE,
    SUMMARY_FILE,
    TRADEOFF_FILE,
    recorded_adapters,
    split_headline,
    write_headline,
    write_headline_draws,
    write_image_grids,
    write_summary,
    write_tradeoff,
)
from helpers.evaluate.protocol import GRID_MODELS, copy_baseline, protocol
from helpers.evaluate.results import CSV_COLUMNS
from helpers.evaluate.stats import SUBJECT_SCORES
from helpers.evaluate.stats import EDIT, OWN
from helpers.share.run_info import read_evaluation, read_run

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "05_evaluation.ipynb"
# notebook 05's calls, as its cells make them
CELLS = ("write_summary(rows, EVAL_DIR)",
         "write_tradeoff(rows, EVAL_DIR, copy_clip_t=copied[EDIT][0], random_weights=profile.random_weights)",
         "write_headline(rows, EVAL_DIR, random_weights=profile.random_weights)",
         "write_headline_draws(gains, EVAL_DIR, rows)",
         "write_image_grids(result.rows, prompts, result.samples, EVAL_DIR)")
# what a notebook kernel may have set (matplotlib-inline once set these; a user may set more)
NOTEBOOK_RC = {"figure.dpi": 72, "figure.facecolor": (1, 1, 1, 0), "font.size": 10, "savefig.dpi": 80,
               "axes.prop_cycle": plt.cycler(color=["k", "r", "g"])}


def test_the_command_line_writes_the_files_notebook_05_writes(tiny_profile, runs, tmp_path, capsys):
    out = tmp_path / "eval"
    result = evaluation_main(["--profile", "tiny", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(runs[0]),
                              "--references", "3", "--edits-per-reference", "1", "--scales", "0.5,1.0",
                              "--out-dir", str(out)])
    assert "The grid is complete" in capsys.readouterr().out and {r["model"] for r in result.rows} == set(GRID_MODELS)
    # the subject-only scores: results.csv's columns, with the references' masks notebook 01 stores (made here)
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == list(CSV_COLUMNS) and (table["segmenter"] == tiny_profile.segmenter).all()
    assert table[list(SUBJECT_SCORES)].notna().all().all() and (tmp_path / "data" / MASKS_FILE).is_file()
    assert {f"{m}_missing" for m in SUBJECT_SCORES} < set(pd.read_csv(out / SUMMARY_FILE).columns)
    # notebook 05's cells on the same rows, in a kernel whose matplotlib settings differ
    profile = tiny_profile.replace(eval_num_references=3, eval_edits_per_reference=1, eval_scales=(0.5, 1.0))
    references, prompts = protocol(profile, use_prepared(tmp_path / "data", profile, progress=False))
    EVAL_DIR, rows = tmp_path / "notebook", pd.DataFrame(result.rows)  # noqa: N806 (the notebook's names)
    EVAL_DIR.mkdir()
    copied = copy_baseline(references, prompts, clip=profile.eval_clip)
    with plt.rc_context(NOTEBOOK_RC):
        write_summary(rows, EVAL_DIR)
        write_tradeoff(rows, EVAL_DIR, copy_clip_t=copied[EDIT][0], random_weights=profile.random_weights)
        _, _, gains = write_headline(rows, EVAL_DIR, random_weights=profile.random_weights)
        write_headline_draws(gains, EVAL_DIR, rows)
        write_image_grids(result.rows, prompts, result.samples, EVAL_DIR)
    plt.close("all")
    written = sorted(p.name for p in EVAL_DIR.iterdir())
    assert {SUMMARY_FILE, HEADLINE_FILE, HEADLINE_TABLE_FILE, TRADEOFF_FILE, HEADLINE_DRAWS_FILE,
            SCALE_SWEEP_FILE} < set(written) and any(n.startswith("side_by_side_") for n in written)
    for name in written:  # byte for byte: text files and figures alike
        assert (out / name).read_bytes() == (EVAL_DIR / name).read_bytes(), name
    with Image.open(out / TRADEOFF_FILE) as im:
        im.verify()  # a whole PNG
    assert set(pd.read_csv(out / SUMMARY_FILE)["prompt_kind"]) == {EDIT, OWN}
    # notebook 05 writes them with these calls, and no string in its code names one of these files
    code = "\n".join(c.source for c in nbformat.read(NOTEBOOK, 4).cells if c.cell_type == "code")
    assert [call for call in CELLS if call not in code] == []
    strings = [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert [(name, s) for name in written for s in strings if name in s] == []
    # a model card built from the command's evaluation has its numbers, the headline and the plot
    evaluation = read_evaluation(out, read_run(runs[0] / "text_aware"))
    assert evaluation.tradeoff == out / TRADEOFF_FILE and evaluation.headline.startswith("RANDOM WEIGHTS")
    assert {r["prompt_kind"] for r in evaluation.rows} == {EDIT, OWN}


def test_the_files_record_the_adapters_their_rows_came_from(tmp_path):
    """tradeoff.png and headline_bootstrap.png (a PNG text chunk), headline.txt (its last line) and headline.csv (a column) say which adapter
    files made them, so the model card can tell a plot of an earlier adapter; rows without adapter_sha256 record
    nothing."""
    ids = {"finetuned-text-aware": "0123456789abcdef", "pretrained": "fedcba9876543210"}
    rows = [dict(r, adapter_sha256=ids[r["model"]])
            for r in synthetic_rows({"pretrained": 0.0, "finetuned-text-aware": 0.02}, n_refs=4)]
    plt.close(write_tradeoff(rows, tmp_path / "with"))
    text, table, gains = write_headline(rows, tmp_path / "with")
    plt.close(write_headline_draws(gains, tmp_path / "with", rows))
    assert recorded_adapters(tmp_path / "with" / TRADEOFF_FILE) == ids
    assert recorded_adapters(tmp_path / "with" / HEADLINE_DRAWS_FILE) == ids
    assert recorded_adapters(tmp_path / "with" / HEADLINE_FILE) == ids
    written = (tmp_path / "with" / HEADLINE_FILE).read_text()
    assert written.splitlines()[-1].startswith(ADAPTERS_LINE) and split_headline(written)[0] == text
    assert ADAPTERS_COLUMN not in table  # what the notebook shows: the table as headline_table gives it
    assert {json.dumps(ids)} == set(pd.read_csv(tmp_path / "with" / HEADLINE_TABLE_FILE)[ADAPTERS_COLUMN])
    bare = [{k: v for k, v in r.items() if k != "adapter_sha256"} for r in rows]
    plt.close(write_tradeoff(bare, tmp_path / "without"))
    assert write_headline(bare, tmp_path / "without")[0] == text
    assert recorded_adapters(tmp_path / "without" / TRADEOFF_FILE) is None
    assert recorded_adapters(tmp_path / "without" / HEADLINE_FILE) is None
    assert (tmp_path / "without" / HEADLINE_FILE).read_text() == text + "\n"
