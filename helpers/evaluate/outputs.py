"""Notebook 05's files, each written by one function here: the notebook's cells and `python -m helpers.evaluate`
call the same ones on the grid's rows, and helpers.share.run_info reads them by these names (results.csv is
helpers.evaluate.results' RESULTS_FILE).

    write_summary(rows, eval_dir)                    summary.csv: each model and scale, per prompt kind
    write_tradeoff(rows, eval_dir, copy_clip_t=...)  tradeoff.png: the trade-off curves (the model card shows it)
    write_headline(rows, eval_dir)                   headline.txt (the model card quotes it) and headline.csv
    write_headline_draws(gains, eval_dir, rows)      headline_bootstrap.png: the headline's bootstrap draws
    write_image_grids(rows, prompts, load, eval_dir) side_by_side_<category>.png and scale_sweep.png
    write_evaluation_outputs(rows, eval_dir, ...)    all of them, in that order (what the command line writes)

Each file records the adapters its rows came from, {model name: adapter_sha256} (adapter_identities): the
figures (but headline_bootstrap.png) in a PNG text chunk ADAPTERS_KEY (JSON), headline.txt in its last line
(ADAPTERS_LINE + JSON), headline.csv in a column. `recorded_adapters(path)` reads them back, so the model card
(helpers.share.run_info) leaves out a figure or headline made from an earlier adapter of its model. Rows without
adapter_sha256 record nothing.

Every file is written whole or not at all (helpers.support.atomic). Figures are drawn in matplotlib's default
style and saved without a "Software" tag (FIGURE_STYLE, SAVEFIG), so the same rows give the same PNG bytes in a
notebook and in a terminal. Rows from a grid stopped part way are fine: each comparison of the headline uses
the references complete for both of its models (helpers.evaluate.stats.complete_references).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..support.atomic import write_text
from .headline import headline, headline_table
from .plots import bootstrap_histogram, category_grids, save_figure, scale_sweep, tradeoff_plot
from .stats import EDIT, IDENTITY, OWN, as_frame, summarize

SUMMARY_FILE = "summary.csv"  # summarize() per prompt kind, with a prompt_kind column
HEADLINE_FILE = "headline.txt"  # headline() in sentences
HEADLINE_TABLE_FILE = "headline.csv"  # headline_table()
TRADEOFF_FILE = "tradeoff.png"
HEADLINE_DRAWS_FILE = "headline_bootstrap.png"
SIDE_BY_SIDE_FILE = "side_by_side_{category}.png"
SCALE_SWEEP_FILE = "scale_sweep.png"
FIGURE_STYLE = "default"  # matplotlib's own defaults, whatever the notebook's backend or a user's rcParams
SAVEFIG = {"dpi": 150, "bbox_inches": "tight", "metadata": {"Software": None}}
ADAPTERS_KEY = "ipa-adapters"  # a figure's PNG text chunk: {model name: adapter_sha256} as JSON
ADAPTERS_LINE = "Adapters used (model: adapter_sha256): "  # headline.txt's last line, then that JSON
ADAPTERS_COLUMN = "adapters (model: adapter_sha256)"  # headline.csv's column, that JSON in every row


def adapter_identities(rows) -> dict:
    """{model name: adapter_sha256} of the rows (sorted by name; {} when they carry no adapter_sha256). Rows of
    two adapters for one model are refused (helpers.evaluate.stats.as_frame)."""
    frame = as_frame(rows)
    if IDENTITY not in frame:
        return {}
    pairs = frame[["model", IDENTITY]].drop_duplicates()
    return {str(m): str(i) for m, i in sorted(zip(pairs["model"], pairs[IDENTITY]))}


def recorded_adapters(source) -> dict | None:
    """The {model: adapter_sha256} a file of this module records: a PNG (a path or its bytes; its text chunks
    come before the pixels, so a cut file still tells) or headline.txt (a path). None when it records none
    (written by an older version, or from rows without adapter_sha256)."""
    if isinstance(source, (bytes, bytearray)) or Path(source).suffix.lower() == ".png":
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                raw = im.info.get(ADAPTERS_KEY)
        except (UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"{source if isinstance(source, Path) else 'the figure'}: not a whole PNG image ({e}); "
                             "run notebook 05's plot cell again") from None
    else:
        raw = split_headline(Path(source).read_text())[1]
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def split_headline(text: str) -> tuple[str, str | None]:
    """headline.txt's text as (the sentences, the recorded adapters' JSON or None)."""
    lines = text.rstrip("\n").split("\n")
    if lines and lines[-1].startswith(ADAPTERS_LINE):
        return "\n".join(lines[:-1]).strip(), lines[-1][len(ADAPTERS_LINE):]
    return text.strip(), None


def _savefig(rows) -> dict:
    """SAVEFIG, with the rows' adapters in the PNG's text chunks."""
    ids = adapter_identities(rows)
    return {**SAVEFIG, "metadata": {**SAVEFIG["metadata"], **({ADAPTERS_KEY: json.dumps(ids)} if ids else {})}}


def _pnginfo(rows) -> dict:
    """PIL's save() keywords that put the rows' adapters in a PNG's text chunks."""
    from PIL.PngImagePlugin import PngInfo

    ids = adapter_identities(rows)
    if not ids:
        return {}
    info = PngInfo()
    info.add_text(ADAPTERS_KEY, json.dumps(ids))
    return {"pnginfo": info}


def write_summary(rows, eval_dir) -> dict:
    """summary.csv: helpers.evaluate.stats.summarize per prompt kind (edit prompts, then own captions; those
    present), one table with a prompt_kind column. Returns {prompt kind: summary DataFrame}."""
    import pandas as pd

    kinds = set(as_frame(rows)["prompt_kind"])
    summaries = {kind: summarize(rows, prompt_kind=kind) for kind in (EDIT, OWN) if kind in kinds}
    table = pd.concat([s.assign(prompt_kind=k) for k, s in summaries.items()], ignore_index=True)
    write_text(Path(eval_dir) / SUMMARY_FILE, table.to_csv(index=False))
    return summaries


def write_tradeoff(rows, eval_dir, *, copy_clip_t: float | None = None, random_weights: bool = False):
    """tradeoff.png: plots.tradeoff_plot of the edit prompts' summary (a subject CLIP-I panel when the rows have
    it), the scores' backbones on the axes;
    copy_clip_t: the unedited references' CLIP-T (protocol.copy_baseline(...)[EDIT][0]). Returns the Figure."""
    import matplotlib.pyplot as plt

    frame = as_frame(rows)
    note = ("RANDOM WEIGHTS: meaningless" if random_weights
            else f"{frame['reference'].nunique()} held-out references, edit prompts")
    with plt.style.context(FIGURE_STYLE):
        fig = tradeoff_plot(summarize(frame, prompt_kind=EDIT), clip_model=_first(frame, "clip_model"),
                            dino_model=_first(frame, "dino_model"), note=note, copy_clip_t=copy_clip_t)
        save_figure(fig, Path(eval_dir) / TRADEOFF_FILE, **_savefig(frame))
    return fig


def write_headline(rows, eval_dir, *, random_weights: bool = False):
    """headline.txt (headline.headline: sentences, then a line ADAPTERS_LINE + the rows' adapters) and
    headline.csv (headline.headline_table, with an ADAPTERS_COLUMN). Returns (text, table, gains): the
    sentences (without the adapters' line) and the table as headline_table gives them."""
    text = headline(rows, random_weights=random_weights)
    ids = adapter_identities(rows)
    record = f"\n\n{ADAPTERS_LINE}{json.dumps(ids)}" if ids else ""
    write_text(Path(eval_dir) / HEADLINE_FILE, text + record + "\n")
    table, gains = headline_table(rows)
    written = table.assign(**{ADAPTERS_COLUMN: json.dumps(ids)}) if ids else table
    write_text(Path(eval_dir) / HEADLINE_TABLE_FILE, written.to_csv(index=False))
    return text, table, gains


def write_headline_draws(gains: dict, eval_dir, rows):
    """headline_bootstrap.png: plots.bootstrap_histogram of the overall comparisons of `gains` (write_headline's
    of `rows`, whose adapters it records). Returns the Figure, or None when no comparison has draws (then no
    file is written)."""
    import matplotlib.pyplot as plt

    drawn = [g for (_, edit), g in gains.items() if edit is None and g is not None and len(g.boots)]
    if not drawn:
        return None
    with plt.style.context(FIGURE_STYLE):
        fig = bootstrap_histogram(drawn)
        save_figure(fig, Path(eval_dir) / HEADLINE_DRAWS_FILE, **_savefig(rows))
    return fig


def write_image_grids(rows, prompts, load, eval_dir, *, n_rows: int = 3):
    """side_by_side_<category>.png (plots.category_grids) and scale_sweep.png (plots.scale_sweep: the first
    edit prompt's reference across every scale). load(rows) -> Samples (GridResult.samples). Returns
    ({category: PIL image}, the sweep's PIL image)."""
    rows = list(rows)
    grids = category_grids(rows, prompts, load, n_rows=n_rows)
    for category, grid in grids.items():
        save_figure(grid, Path(eval_dir) / SIDE_BY_SIDE_FILE.format(category=category), **_pnginfo(rows))
    first = next((p for p in prompts if p.kind == EDIT), prompts[0])
    picked = [r for r in rows if r["reference"] == first.reference and r["prompt"] == first.prompt]
    sweep = scale_sweep(load(picked), first.reference, first.prompt)
    save_figure(sweep, Path(eval_dir) / SCALE_SWEEP_FILE, **_pnginfo(rows))
    return grids, sweep


@dataclass
class EvaluationOutputs:
    """What write_evaluation_outputs wrote, for display: the summaries, the headline and the figures."""

    summaries: dict
    headline: str
    table: object = field(repr=False)
    gains: dict = field(repr=False)
    files: list = field(default_factory=list)  # the paths written


def write_evaluation_outputs(rows, eval_dir, *, copy_clip_t: float | None = None, random_weights: bool = False,
                             prompts=None, load=None) -> EvaluationOutputs:
    """Every file of notebook 05 beside results.csv, from the grid's rows, as the notebook's cells write them:
    write_summary, write_tradeoff, write_headline, write_headline_draws, and (given prompts and load)
    write_image_grids. Figures are closed once saved."""
    import matplotlib.pyplot as plt

    eval_dir = Path(eval_dir)
    summaries = write_summary(rows, eval_dir)
    plt.close(write_tradeoff(rows, eval_dir, copy_clip_t=copy_clip_t, random_weights=random_weights))
    text, table, gains = write_headline(rows, eval_dir, random_weights=random_weights)
    names = [SUMMARY_FILE, TRADEOFF_FILE, HEADLINE_FILE, HEADLINE_TABLE_FILE]
    draws = write_headline_draws(gains, eval_dir, rows)
    if draws is not None:
        plt.close(draws)
        names.append(HEADLINE_DRAWS_FILE)
    if prompts is not None and load is not None:
        grids, _ = write_image_grids(rows, prompts, load, eval_dir)
        names += [SIDE_BY_SIDE_FILE.format(category=c) for c in grids] + [SCALE_SWEEP_FILE]
    return EvaluationOutputs(summaries, text, table, gains, [eval_dir / n for n in names])


def _first(frame, column: str) -> str:
    return str(frame[column].iloc[0]) if column in frame else ""
