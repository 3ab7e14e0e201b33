"""Generated images laid out as a labelled grid (a PIL image): notebooks 03, 04 and 05, and the model card; and
a gallery's images made by the processes of a launch together.

    image_grid(samples, rows=("reference", "prompt"), cols="model")   rows and columns named by Sample settings
    samples = generate_shared(bank, references, prompts, scales=..., seeds=...)   generate's images, any launch
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from ..support import ranks
from .generate import SETTING_NAMES, Sample, as_list
from .generate import generate as generate_images


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _label(sample: Sample, keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        v = getattr(sample, k)
        parts.append(f"{k} {v:g}" if k in ("scale", "guidance") else f"seed {v}" if k == "seed" else str(v))
    return "\n".join(parts)


def image_grid(samples: list[Sample], rows=("reference", "prompt"), cols=("model", "scale"), *, cell: int | None = None,
               thumbnails: bool = True, label_width: int | None = None, title: str | None = None) -> Image.Image:
    """A labelled grid (PIL image): one row per distinct value of the `rows` settings, one column per
    distinct value of the `cols` settings (in order of first appearance), the reference's thumbnail in the
    first column. Default: references x prompts down, models x scales across.

    cell: side of each square picture in pixels (default: the image size, at least 128 and at most 256).
    The labels are also in `grid.info["rows"]`, `grid.info["cols"]` (lists of strings) and `grid.info["title"]`.
    Raises ValueError if two samples fall in the same cell (add e.g. "seed" to rows or cols).
    """
    if not samples:
        raise ValueError("no samples to lay out")
    rows, cols = tuple(as_list(rows)), tuple(as_list(cols))
    for k in rows + cols:
        if k not in SETTING_NAMES:
            raise ValueError(f"unknown setting {k!r}: choose from {SETTING_NAMES}")
    row_keys = list(dict.fromkeys(tuple(getattr(s, k) for k in rows) for s in samples))
    col_keys = list(dict.fromkeys(tuple(getattr(s, k) for k in cols) for s in samples))
    cells: dict[tuple, Sample] = {}
    for s in samples:
        key = (tuple(getattr(s, k) for k in rows), tuple(getattr(s, k) for k in cols))
        if key in cells:
            varying = [k for k in SETTING_NAMES if getattr(s, k) != getattr(cells[key], k)]
            raise ValueError(f"two samples share the cell {key}: they differ in {varying}; add one of those to "
                             "rows or cols, or pass fewer samples")
        cells[key] = s
    cell = cell or max(128, min(256, samples[0].image.width))
    font = _font(max(10, cell // 12))
    line_h = max(12, cell // 10)
    chars = max(12, int(cell / (cell // 12 * 0.55)))  # characters per line in a cell-wide label
    label_width = label_width or cell
    show_ref = thumbnails and "reference" in rows and all(s.reference_image is not None for s in samples)
    first_of_row = {rk: next(s for (r, _), s in cells.items() if r == rk) for rk in row_keys}
    row_labels = [_label(first_of_row[rk], rows) for rk in row_keys]
    col_labels = [_label(next(s for (_, c), s in cells.items() if c == ck), cols) for ck in col_keys]
    wrap = lambda text, width: "\n".join(textwrap.fill(t, width) for t in text.split("\n"))  # noqa: E731
    x0 = label_width + (cell if show_ref else 0)
    width = x0 + cell * len(col_keys)
    title_lines = textwrap.wrap(title, max(12, int(chars * width / cell))) if title else []
    label_lines = max(len(wrap(c, chars).split("\n")) for c in col_labels)
    header = line_h * (len(title_lines) + label_lines) + 8
    grid = Image.new("RGB", (width, header + cell * len(row_keys)), "white")
    draw = ImageDraw.Draw(grid)
    if title_lines:
        draw.multiline_text((4, 2), "\n".join(title_lines), fill="black", font=font, spacing=2)
    top = 4 + line_h * len(title_lines)
    if show_ref:
        draw.text((label_width + 4, top), "reference", fill="black", font=font)
    for j, text in enumerate(col_labels):
        draw.multiline_text((x0 + j * cell + 4, top), wrap(text, chars), fill="black", font=font, spacing=2)
    for i, rk in enumerate(row_keys):
        y = header + i * cell
        draw.multiline_text((4, y + 4), wrap(row_labels[i], int(chars * label_width / cell)), fill="black",
                            font=font, spacing=2)
        if show_ref:
            grid.paste(first_of_row[rk].reference_image.convert("RGB").resize((cell, cell)), (label_width, y))
        for j, ck in enumerate(col_keys):
            s = cells.get((rk, ck))
            if s is not None:
                resample = Image.NEAREST if s.image.width < cell else Image.LANCZOS
                grid.paste(s.image.convert("RGB").resize((cell, cell), resample), (x0 + j * cell, y))
    grid.info.update(rows=row_labels, cols=col_labels, title=title or "")
    return grid


def generate_shared(bank, references: dict, prompts, *, models=None, scales=(1.0,), seeds=(0,), generate=None,
                    **settings) -> list[Sample]:
    """helpers.sample.generate.generate(bank, references, prompts, ...), made by the processes of a launch
    together (torchrun / accelerate launch, one per GPU; helpers.support.ranks): its jobs, model x scale x
    reference, dealt out round-robin, each made by one call of generate as one process makes it (a call's
    batches hold one reference's prompts x seeds, so the batches and the images are the same), and every
    image gathered back to every process, in generate's order (models x scales x references x prompts x seeds).
    A lone process (notebook 04) calls generate once, as before.

    generate: the generation function (default helpers.sample.generate.generate; tests pass a stand-in);
    settings: generate's other arguments (steps, guidance, batch_size, ...; progress defaults to the main
    process's)."""
    generate = generate or generate_images
    if ranks.world_size() == 1:
        return generate(bank, references, prompts, models=models, scales=scales, seeds=seeds, **settings)
    settings.setdefault("progress", ranks.is_main())
    table = ({r: as_list(prompts.get(r, [])) for r in references} if isinstance(prompts, dict)
             else {r: as_list(prompts) for r in references})
    models = list(getattr(bank, "names", bank) if models is None else as_list(models))
    jobs = [(m, float(s), r) for m in models for s in as_list(scales) for r in references]
    mine = {job: generate(bank, {job[2]: references[job[2]]}, {job[2]: table[job[2]]}, models=[job[0]],
                          scales=(job[1],), seeds=seeds, **settings) for job in ranks.my_share(jobs)}
    made = {job: samples for share in ranks.gather(mine) for job, samples in share.items()}
    return [s for job in jobs for s in made[job]]
