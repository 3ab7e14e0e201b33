"""helpers.sample.saved: generated images keep their settings on disk, and read back."""
import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _samples import fake_samples, pixels
from PIL import Image

from helpers.sample.saved import load_saved, png_settings, save_samples


def test_saved_settings_round_trip(tmp_path):
    samples = fake_samples(scales=(0.5,))
    samples[0].prompt, samples[0].negative_prompt = 'a "quoted", prompt, with commas', "blurry"
    paths = save_samples(samples, tmp_path)
    assert len(paths) == len(set(paths)) == 4 and all(p.suffix == ".png" for p in paths)
    for s, p in zip(samples, paths):
        assert png_settings(p) == s.settings()
        with Image.open(p) as im:
            assert im.text["prompt"] == s.prompt and im.text["seed"] == "0"  # readable in any PNG viewer
    rows = json.loads((tmp_path / "index.json").read_text())
    assert [r["file"] for r in rows] == [p.name for p in paths] and rows[0]["scale"] == 0.5
    with open(tmp_path / "index.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["prompt"] == samples[0].prompt and table[0]["model"] == "pretrained"
    back = load_saved(tmp_path)
    assert [b.settings() for b in back] == [s.settings() for s in samples]
    assert all(np.array_equal(pixels(b.image), pixels(s.image)) for b, s in zip(back, samples))
    save_samples(samples[:1], tmp_path)  # the same image again: no duplicate row
    save_samples(fake_samples(scales=(1.0,))[:1], tmp_path)  # another one: one more row
    assert len(json.loads((tmp_path / "index.json").read_text())) == 5
    with pytest.raises(ValueError, match="no 'ipa-settings'"):
        Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
        png_settings(tmp_path / "plain.png")


def test_a_full_disk_names_the_file_and_leaves_no_half_image(tmp_path, monkeypatch):
    """ENOSPC from the PNG writer (patched): DiskFull naming the file, the old file and index as they were, no
    temporary left; saving again gives what an uninterrupted save gives."""
    import errno

    from helpers.support.disk import DiskFull

    samples = fake_samples(scales=(0.5,))
    first = save_samples(samples[:1], tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = Image.Image.save

    def save(self, fp, format=None, **kw):
        real_save(self, fp, format, **kw)  # the bytes went out, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(DiskFull, match=f"could not write .*{first[0].name[:20]}"):
        save_samples(samples, tmp_path)  # the first file again: its old copy must survive
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    paths = save_samples(samples, tmp_path)
    whole = tmp_path / "whole"
    assert [p.name for p in paths] == [p.name for p in save_samples(samples, whole)]
    assert all(p.read_bytes() == (whole / p.name).read_bytes() for p in paths)
    assert (tmp_path / "index.json").read_text() == (whole / "index.json").read_text()


def test_two_writers_saving_into_one_folder_keep_each_others_rows(tmp_path):
    """Two processes (two notebook-04 sessions) save different samples into one folder at the same moment, round
    after round: every file of both ends in index.json and index.csv, and no lock is left behind."""
    rounds, start = 12, time.time() + 3  # both begin at the same instant, after their imports
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from _samples import fake_samples
        from helpers.sample.saved import save_samples
        writer = sys.argv[1]
        time.sleep(max(0.0, {start} - time.time()))
        for r in range({rounds}):
            save_samples(fake_samples(models=("w" + writer,), scales=(r + 1,), refs=("a", "b"), size=16),
                         {str(tmp_path)!r})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, w], env={**os.environ, "WORLD_SIZE": "1"},
                              stderr=subprocess.PIPE, text=True) for w in ("1", "2")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2 * rounds * 2
    assert sorted(r["file"] for r in json.loads((tmp_path / "index.json").read_text())) == pngs
    with open(tmp_path / "index.csv", newline="") as f:
        assert sorted(r["file"] for r in csv.DictReader(f)) == pngs
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == ["index.csv", "index.json"]
