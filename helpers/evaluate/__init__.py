"""Notebook 05: CLIP-T against CLIP-I and DINO, across IP-Adapter scales (`python -m helpers.evaluate`).

    metrics.py      the scores: plain cosines through torchmetrics' CLIP score code, and DINO; the same on the
                    character alone and on the background alone (masks by the segmenter, helpers.data.masks)
    protocol.py     references (held out, checked), prompts (own caption + edits), the grid's settings and size
    grid.py         generate and score the grid, one row per image: the headline comparison first, resumable,
                    and grown across sittings
    scoring.py      a job's images scored into rows (the references' masks, the subject-only scores)
    grid_result.py  what the grid returns: its rows in grid order, how far it got, its images
    results.py      results.csv: append-only, exact round trip
    stats.py        the idea of the comparison: intervals over references, paired differences, matched gain
    headline.py     the text-aware model against every baseline, as tables and sentences
    plots.py        the trade-off curve, side-by-side grids, the bootstrap histogram, the published numbers
    outputs.py      notebook 05's files (summary.csv, headline, tradeoff.png, ...), one writer for 05 and the command
"""

_ENTRY_POINTS = {"clip_t", "clip_i", "dino", "subject_scores"}


def __getattr__(name):  # the entry points, imported on first use so that `helpers.evaluate.stats` stays light
    if name in _ENTRY_POINTS:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
