"""The tiny profile's dataset: procedurally drawn cartoon characters with captions, and a mirrored copy of each,
stored as the Hub stores the Rick and Morty dataset (parquet under data/, columns image and text).

    build_cartoon_dataset(folder)       the dataset, loadable with datasets.load_dataset(folder, split="train")
    draw_character(i, pose, scene)      one drawing (asymmetric, so that its mirror differs)
    character_mask(i, pose, scene)      its true character mask (the oracle: PIL "L", 255 on the character)
    cartoon_rows(size)                  the dataset's rows in its order: (drawing, caption, true mask)

The oracle mask is drawn with the drawing, shape by shape: every shape of the character (body, legs, arms,
head, eyes, smile, hair) is painted 255 on it with the same outline widths, the scene and its sun or moon not.
So a test can check the mask plumbing (an alpha channel, a masks folder) against the truth, pixel for pixel.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

CHARACTERS = [  # (description, skin, hair colour name, hair rgb, shirt colour name, shirt rgb, hair style)
    ("a scientist", (236, 214, 190), "blue", (120, 170, 230), "white", (245, 245, 245), "spiky"),
    ("a boy", (245, 205, 170), "brown", (120, 80, 40), "yellow", (245, 220, 60), "flat"),
    ("a girl", (240, 200, 165), "orange", (235, 120, 40), "pink", (240, 130, 180), "long"),
    ("an alien", (140, 210, 120), "purple", (140, 70, 180), "grey", (150, 150, 150), "antenna"),
    ("a robot", (180, 190, 200), "black", (40, 40, 40), "red", (210, 50, 50), "flat"),
    ("a woman", (220, 180, 150), "red", (190, 40, 40), "green", (60, 160, 80), "long"),
    ("an old man", (230, 200, 180), "white", (235, 235, 235), "brown", (140, 100, 60), "spiky"),
    ("a cat", (250, 170, 80), "black", (30, 30, 30), "blue", (60, 90, 200), "ears"),
]

POSES = ["standing", "waving", "jumping"]

SCENES = [("sky", (150, 200, 245), "in front of a blue sky"), ("grass", (120, 190, 100), "on green grass"),
          ("space", (20, 20, 50), "in space at night")]


class _Canvas:
    """Draws each shape on the picture and, for the character's shapes, 255 on its mask (same geometry)."""

    def __init__(self, im, mask):
        from PIL import ImageDraw

        self.d, self.m = ImageDraw.Draw(im), ImageDraw.Draw(mask)

    def __getattr__(self, shape):  # d.ellipse(...), d.line(...), ...: the picture; character=False: not the mask
        def draw(xy, *args, character=True, **kw):
            getattr(self.d, shape)(xy, *args, **kw)
            if character:
                getattr(self.m, shape)(xy, *args, **{k: (255 if k in ("fill", "outline") and v is not None else v)
                                                     for k, v in kw.items()})
        return draw


def draw_character_and_mask(index: int, pose: str, scene: int, size: int = 128):
    """(drawing, true mask): one asymmetric cartoon character (PIL RGB; asymmetry makes mirrors differ) and
    the pixels of the character in it (PIL "L": 255 on the character, 0 on the scene)."""
    from PIL import Image

    desc, skin, _, hair, _, shirt, style = CHARACTERS[index]
    _, bg, _ = SCENES[scene]
    s = size / 128
    im = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    d = _Canvas(im, mask)
    S = lambda *xy: [v * s for v in xy]  # noqa: E731  (scale 128-px coordinates)
    d.ellipse(S(96, 8, 120, 32), fill=(250, 230, 90) if scene != 2 else (230, 230, 230), character=False)  # sun / moon
    dy = -14 if pose == "jumping" else 0
    d.rectangle(S(48, 66 + dy, 80, 104 + dy), fill=shirt, outline=(0, 0, 0), width=max(1, int(2 * s)))  # body
    d.line(S(56, 104 + dy, 52, 122 + dy), fill=(0, 0, 0), width=max(1, int(4 * s)))  # legs
    d.line(S(72, 104 + dy, 76, 122 + dy), fill=(0, 0, 0), width=max(1, int(4 * s)))
    d.line(S(48, 72 + dy, 34, 96 + dy), fill=skin, width=max(1, int(5 * s)))  # left arm down
    if pose == "waving":
        d.line(S(80, 72 + dy, 100, 48 + dy), fill=skin, width=max(1, int(5 * s)))  # right arm up
    else:
        d.line(S(80, 72 + dy, 94, 96 + dy), fill=skin, width=max(1, int(5 * s)))
    d.ellipse(S(40, 22 + dy, 88, 70 + dy), fill=skin, outline=(0, 0, 0), width=max(1, int(2 * s)))  # head
    d.ellipse(S(50, 38 + dy, 60, 48 + dy), fill=(255, 255, 255), outline=(0, 0, 0))  # eyes, looking right
    d.ellipse(S(66, 38 + dy, 76, 48 + dy), fill=(255, 255, 255), outline=(0, 0, 0))
    d.ellipse(S(55, 41 + dy, 59, 45 + dy), fill=(0, 0, 0))
    d.ellipse(S(71, 41 + dy, 75, 45 + dy), fill=(0, 0, 0))
    d.arc(S(54, 50 + dy, 76, 62 + dy), 20, 160, fill=(0, 0, 0), width=max(1, int(2 * s)))  # smile
    if style == "spiky":
        for x in range(40, 88, 8):
            d.polygon(S(x, 30 + dy, x + 8, 30 + dy, x + 10, 12 + dy), fill=hair)
    elif style == "flat":
        d.chord(S(40, 20 + dy, 88, 50 + dy), 180, 360, fill=hair)
    elif style == "long":
        d.chord(S(38, 18 + dy, 90, 50 + dy), 180, 360, fill=hair)
        d.rectangle(S(36, 34 + dy, 44, 80 + dy), fill=hair)
    elif style == "antenna":
        d.line(S(70, 24 + dy, 82, 6 + dy), fill=hair, width=max(1, int(3 * s)))
        d.ellipse(S(78, 2 + dy, 86, 10 + dy), fill=hair)
    elif style == "ears":
        d.polygon(S(42, 34 + dy, 48, 12 + dy, 58, 26 + dy), fill=hair)
        d.polygon(S(70, 26 + dy, 80, 12 + dy, 86, 34 + dy), fill=hair)
    return im, mask


def draw_character(index: int, pose: str, scene: int, size: int = 128):
    """Draw one asymmetric cartoon character (PIL RGB image). Asymmetry makes mirrors differ."""
    return draw_character_and_mask(index, pose, scene, size)[0]


def character_mask(index: int, pose: str, scene: int, size: int = 128):
    """The true mask of draw_character(index, pose, scene, size): PIL "L", 255 on the character, 0 elsewhere."""
    return draw_character_and_mask(index, pose, scene, size)[1]


def cartoon_caption(index: int, pose: str, scene: int) -> str:
    desc, _, hair_name, _, shirt_name, _, style = CHARACTERS[index]
    hair = "ears" if style == "ears" else "hair"
    return f"a cartoon drawing of {desc} with {hair_name} {hair} and a {shirt_name} shirt {pose} {SCENES[scene][2]}"


def cartoon_rows(size: int = 128) -> list[tuple]:
    """The dataset's rows in its order, with the oracle: [(drawing PIL RGB, caption, true mask PIL "L")], 24
    drawings and their mirrors (the mirror's mask mirrored too), shuffled with a fixed seed."""
    from PIL import ImageOps

    rng = random.Random(0)
    rows = []
    for c in range(len(CHARACTERS)):
        for p, pose in enumerate(POSES):
            scene = (c + p) % len(SCENES)
            (im, mask), text = draw_character_and_mask(c, pose, scene, size), cartoon_caption(c, pose, scene)
            rows += [(im, text, mask), (ImageOps.mirror(im), text, ImageOps.mirror(mask))]
    rng.shuffle(rows)
    return rows


def build_cartoon_dataset(folder: str | os.PathLike, size: int = 128) -> Path:
    """Write the synthetic dataset (48 rows: 24 drawings + their mirrors) as the Hub stores datasets.

    Layout: folder/data/train-00000-of-00001.parquet with columns `image` (datasets.Image) and `text`,
    loadable with `datasets.load_dataset(str(folder), split="train")`.
    """
    import datasets

    folder = Path(folder)
    rows = cartoon_rows(size)
    ds = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "text": [r[1] for r in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text(
        "# Synthetic cartoon characters (tiny profile)\n\nProcedurally drawn by helpers.tiny: "
        f"{len(CHARACTERS)} characters x {len(POSES)} poses, each with a horizontally mirrored copy "
        f"({len(rows)} rows). Columns: image, text. For tests only.\n"
    )
    return folder
