"""rehearsal: the mirror's dataset loads offline by its Hub id, as after an online load (the model repos are
checked by `./run.sh rehearse` itself: they are 11 GiB)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_mirrored_dataset_loads_offline_by_hub_id(tmp_path):
    from rehearsal import dataset
    from rehearsal.hub_cache import RepoWriter, write_datasets_cache

    repo = RepoWriter(tmp_path / "hub", dataset.REPO_ID, "0" * 40, "dataset")
    rows = dataset.build_dataset(repo)
    files = repo.finish()
    assert files == ["README.md", dataset.PARQUET] and (repo.snapshot / dataset.PARQUET).is_symlink()
    write_datasets_cache(tmp_path / "datasets", repo)

    code = ("import datasets, json, numpy as np; from PIL import ImageOps\n"
            f"ds = datasets.load_dataset({dataset.REPO_ID!r}, split='train')\n"
            "ims = [np.asarray(r['image']) for r in ds]\n"
            "mirrored = sum(any(np.array_equal(np.asarray(ImageOps.mirror(r['image'])), o) for o in ims) for r in ds)\n"
            "print(json.dumps([len(ds), ds.column_names, list(ds[0]['image'].size), mirrored]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    n, columns, size, mirrored = json.loads(out.stdout.strip().splitlines()[-1])
    assert (n, columns, size) == (rows, ["image", "text"], [dataset.SIZE, dataset.SIZE])
    assert mirrored == rows  # every drawing comes with its horizontal mirror
