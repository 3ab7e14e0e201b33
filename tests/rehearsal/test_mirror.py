"""rehearsal: the mirror's dataset and CLIPSeg load offline by their Hub ids, as after an online load (the other
model repos are checked by `./run.sh rehearse` itself: they are 11 GiB)."""
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


def test_mirrored_clipseg_loads_offline_by_hub_id_at_its_real_shapes(tmp_path):
    """CIDAS/clipseg-rd64-refined as the mirror holds it (580 MiB, about 10 s): helpers.data.masks loads it by its
    Hub id, offline, with about 150 M parameters, the refined decoder and the 352 px processor."""
    from rehearsal import models
    from rehearsal.hub_cache import RepoWriter
    from rehearsal.vocab import clip_bpe

    vocab, merges, _ = clip_bpe(tmp_path / "downloads")
    repo = RepoWriter(tmp_path / "hub", models.CLIPSEG, "0" * 40)
    models.build_clipseg(repo, vocab, merges)
    assert repo.finish() == ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
                             "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    code = ("import json; from PIL import Image; from helpers.data.masks import load_segmenter, segment\n"
            f"seg = load_segmenter({models.CLIPSEG!r}, device='cpu')\n"
            "m = segment([Image.new('RGB', (64, 64), 'white')], ['a cartoon character'], segmenter=seg)\n"
            "c = seg.model.config\n"
            "print(json.dumps([sum(p.numel() for p in seg.model.parameters()), c.use_complex_transposed_convolution,"
            " c.reduce_dim, seg.processor.image_processor.size['height'], list(m.shape)]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    params, refined, reduce_dim, size, shape = json.loads(out.stdout.strip().splitlines()[-1])
    assert 149e6 < params < 152e6 and refined and reduce_dim == 64 and size == 352 and shape == [1, 64, 64]
