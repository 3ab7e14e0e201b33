"""Test support: a folder of "own" images as a user would assemble one (PNGs + metadata.jsonl)."""
import json

from PIL import ImageOps

from helpers.tiny.cartoons import POSES, draw_character


def own_images(folder, n_drawings=6, size=64) -> dict[str, str]:
    """n_drawings drawings and a mirrored copy of each (2 * n_drawings PNGs) in `folder`, with a caption for
    each in metadata.jsonl. Returns {file name: caption}. 6 drawings give 12 images in 6 mirror pairs: a test
    fraction of 0.1 or 0.25 then holds out a single pair (2 rows, 1 near-duplicate group)."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(n_drawings):
        im = draw_character(i % 8, POSES[i % 3], i % 3, size=size)
        for name, picture, how in ((f"mine_{i:02d}.png", im, ""), (f"mine_{i:02d}_mirror.png", ImageOps.mirror(im),
                                                                   ", mirrored")):
            picture.save(folder / name)
            captions[name] = f"my own drawing number {i}{how}"
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": k, "text": v}) + "\n"
                                                   for k, v in captions.items()))
    return captions
