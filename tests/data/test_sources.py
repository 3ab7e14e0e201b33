"""helpers.data.sources: a source reads only what lies in its own folder (parquet `path` entries, symlinks)."""
import io
import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.data.prepare import prepare_dataset
from helpers.data.sources import _dataset_items, own_folders
from helpers.tiny.cartoons import draw_character

RES = 32


def drawing(i) -> bytes:
    buf = io.BytesIO()
    draw_character(i, "standing", i % 3, size=48).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def private(tmp_path):
    """A picture outside every dataset folder: what a crafted row or link would smuggle in."""
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "secret.png").write_bytes(drawing(7))
    return folder / "secret.png"


def test_parquet_paths_outside_its_folder_are_skipped(tmp_path, private):
    shared = tmp_path / "shared"
    (shared / "imgs").mkdir(parents=True)
    (shared / "imgs" / "a.png").write_bytes(drawing(1))
    (shared / "imgs" / "b.png").write_bytes(drawing(2))
    os.symlink(private, shared / "imgs" / "link.png")  # inside by name, outside in fact
    rows = [{"bytes": drawing(0), "path": "/anywhere/x.png"},  # bytes win: the path is only a name
            {"bytes": None, "path": str(private)},
            {"bytes": None, "path": str(shared / "imgs" / "a.png")},
            {"bytes": None, "path": "imgs/b.png"},  # relative: to the parquet file's folder
            {"bytes": None, "path": str(shared / "imgs" / "link.png")},
            {"bytes": None, "path": "../private/secret.png"}]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = pa.table({"image": rows, "text": [f"row {i}" for i in range(len(rows))]},
                     schema=features.arrow_schema)  # written as it is: datasets would read the files
    pq.write_table(table, shared / "set.parquet")
    out = tmp_path / "out"
    prep = prepare_dataset(shared / "set.parquet", out, resolution=RES, test_fraction=0, progress=False)
    assert sorted(prep.train["id"]) == ["row-00000", "row-00002", "row-00003"]
    reasons = dict(prep.skipped)
    assert sorted(reasons) == ["row 1", "row 4", "row 5"]
    for row in ("row 1", "row 4", "row 5"):
        assert reasons[row].startswith("outside the dataset") and str(shared) in reasons[row]
    assert str(private) in reasons["row 1"]
    assert json.loads((out / prep.info["splits"] / "skipped.json").read_text()) == [{"item": n, "reason": r} for n, r in prep.skipped]


def test_symlinks_in_an_image_folder_are_kept_inside_and_skipped_outside(tmp_path, private):
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    (pics / "a.png").write_bytes(drawing(0))
    (pics / "sub" / "b.png").write_bytes(drawing(1))
    os.symlink(pics / "sub" / "b.png", pics / "alias.png")  # a link inside the folder: kept
    os.symlink(private, pics / "out.png")  # a link out of it: skipped
    os.symlink(private.parent, pics / "elsewhere", target_is_directory=True)  # a linked folder out of it
    prep = prepare_dataset(pics, tmp_path / "out", resolution=RES, test_fraction=0, progress=False)
    assert sorted(prep.train["id"]) == ["a.png", "alias.png", "sub/b.png"]
    reasons = dict(prep.skipped)
    assert reasons["out.png"].startswith("outside the dataset") and str(private) in reasons["out.png"]
    assert "elsewhere/secret.png" not in prep.train["id"]  # if listed at all, then as skipped
    assert all(r.startswith("outside the dataset") for r in reasons.values())


def test_a_hub_datasets_own_folder_is_its_cache(tmp_path, private, monkeypatch):
    """A Hub dataset loaded as an image folder gives absolute paths into the cache: those are its own files."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    (cache / "datasets" / "downloads" / "extracted" / "0a1b").mkdir(parents=True)
    inside = cache / "datasets" / "downloads" / "extracted" / "0a1b" / "c.png"
    inside.write_bytes(drawing(3))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    own = own_folders("owner/name")
    assert cache / "datasets" in own and cache / "hub" in own
    ds = datasets.Dataset.from_dict({"image": [str(inside), str(private)]}).cast_column("image", datasets.Image())
    items, _ = _dataset_items(ds, own)
    assert items[0].read() == inside.read_bytes()
    with pytest.raises(Exception, match="outside the dataset"):
        items[1].read()
