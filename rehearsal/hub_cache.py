"""Write Hugging Face caches as an earlier online run would have left them.

Hub cache (HF_HUB_CACHE, what `from_pretrained` / `hf_hub_download` read offline):

    models--ORG--NAME/                      (datasets--ORG--NAME/ for a dataset repo)
        refs/main                           the revision, 40 hex digits
        blobs/<sha256 or git sha1>          file contents (sha256 for LFS-tracked files, git blob sha1 otherwise)
        snapshots/<revision>/<path>         relative symlinks into blobs/

Datasets cache (HF_DATASETS_CACHE): offline, `datasets.load_dataset("ORG/NAME")` never reads the hub cache.
It reads what the Parquet builder wrote during an earlier online load:

    ORG___snake_case_name/default/0.0.0/<revision>/
        dataset_info.json, snake_case_name-train.arrow

`write_datasets_cache` runs that same builder through `datasets.load_dataset_builder(repo_id)` in a process
whose hub cache is the mirror's, offline. Two calls that need the Hub online are stood in for: the module
factory (the Hub's file listing and README: here `datasets`' own factory reads them from the snapshot, and
the data files are given as the hf:// URLs an online load uses) and HfFileSystem.resolve_path (which asks the
Hub whether the revision exists). The Parquet file itself comes through hf_hub_download from the hub cache,
as online.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

LFS_SUFFIXES = {".safetensors", ".bin", ".parquet", ".msgpack", ".h5", ".onnx", ".ckpt", ".pt", ".pth"}


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    return f"{repo_type}s--" + repo_id.replace("/", "--")


def _blob_name(path: Path) -> str:
    h = hashlib.sha256() if path.suffix in LFS_SUFFIXES else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class RepoWriter:
    """One repo in a hub cache. Write files under `.snapshot` (plain files, e.g. with save_pretrained),
    then `finish()` moves them into blobs/ and leaves symlinks, and writes refs/main."""

    def __init__(self, hub_dir: Path, repo_id: str, revision: str, repo_type: str = "model"):
        self.repo_id, self.revision, self.repo_type = repo_id, revision, repo_type
        self.root = Path(hub_dir) / repo_folder_name(repo_id, repo_type)
        self.snapshot = self.root / "snapshots" / revision
        self.snapshot.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        p = self.snapshot / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_bytes(self, rel: str, data: bytes) -> Path:
        p = self.path(rel)
        p.write_bytes(data)
        return p

    def copy(self, src: Path, rel: str) -> Path:
        p = self.path(rel)
        shutil.copyfile(src, p)
        return p

    def finish(self) -> list[str]:
        """Content-address every file; returns the repo's file list (paths in the snapshot)."""
        blobs = self.root / "blobs"
        blobs.mkdir(exist_ok=True)
        files = []
        for p in sorted(self.snapshot.rglob("*")):
            if p.is_symlink() or not p.is_file():
                continue
            blob = blobs / _blob_name(p)
            if blob.exists():
                p.unlink()
            else:
                os.replace(p, blob)
            p.symlink_to(os.path.relpath(blob, p.parent))
            files.append(p.relative_to(self.snapshot).as_posix())
        (self.root / "refs").mkdir(exist_ok=True)
        (self.root / "refs" / "main").write_text(self.revision)
        return files


def _hub_module(snapshot: Path, repo_id: str, revision: str):
    """The DatasetModule an online load makes for repo_id@revision (Parquet builder, the README card's
    features, data/ patterns, hf:// data files, revision as hash), computed from the local snapshot by the
    installed `datasets`' own factory for local folders."""
    import datasets.load as load
    from datasets.data_files import DataFilesDict, DataFilesList
    from datasets.naming import camelcase_to_snakecase

    factory = getattr(load, "LocalDatasetModuleFactory", None) or getattr(load, "LocalDatasetModuleFactoryWithoutScript")
    module = factory(str(snapshot)).get_module()
    local, remote = snapshot.resolve().as_posix(), f"hf://datasets/{repo_id}@{revision}"
    for cfg in module.builder_configs_parameters.builder_configs or []:
        if cfg.data_files is not None:
            cfg.data_files = DataFilesDict({
                split: DataFilesList([f.replace(local, remote, 1) for f in files], files.origin_metadata)
                for split, files in cfg.data_files.items()})
    module.hash = revision
    module.builder_kwargs = {"base_path": remote, "repo_id": repo_id,
                             "dataset_name": camelcase_to_snakecase(repo_id.split("/")[-1])}
    return module


def _offline_resolve(self, path: str, revision=None, **kwargs):
    """HfFileSystem.resolve_path without the Hub API: 'hf://datasets/ORG/NAME@REV/PATH' split into parts
    (online, the same parts come back after a call that checks the revision exists)."""
    from huggingface_hub import hf_file_system as hfs

    resolved = getattr(hfs, "HfFileSystemResolvedRepositoryPath", None) or hfs.HfFileSystemResolvedPath
    rest = path[len("hf://"):] if path.startswith("hf://") else path
    kind, org, name_rev, *parts = rest.split("/")
    name, _, rev = name_rev.partition("@")
    return resolved(kind.rstrip("s"), f"{org}/{name}", revision or rev, "/".join(parts))


def _prepare_cache(hub_dir: str, datasets_dir: str, repo_id: str, revision: str) -> str:
    """Run in a process whose HF_HUB_CACHE is hub_dir and HF_HUB_OFFLINE=1 (see write_datasets_cache)."""
    import datasets
    import datasets.load as load
    from huggingface_hub import HfFileSystem

    snapshot = Path(hub_dir) / repo_folder_name(repo_id, "dataset") / "snapshots" / revision
    module = _hub_module(snapshot, repo_id, revision)
    with mock.patch.object(load, "dataset_module_factory", lambda *a, **k: module), \
            mock.patch.object(HfFileSystem, "resolve_path", _offline_resolve):
        builder = datasets.load_dataset_builder(repo_id, cache_dir=datasets_dir)
        builder.download_and_prepare()  # downloads = hf_hub_download from the hub cache, as online
    return builder.cache_dir


def write_datasets_cache(datasets_dir: Path, repo: RepoWriter) -> Path:
    """Build the Arrow cache of dataset `repo` (already finished) into datasets_dir, as an online
    `load_dataset(repo.repo_id)` at repo.revision would: the Parquet builder, fed by hf_hub_download from
    the mirror's hub cache. Runs in a subprocess so that the libraries read these caches from their
    environment, as they do in the rehearsal. Returns the cache folder."""
    hub_dir = repo.root.parent
    env = {**os.environ, "HF_HUB_CACHE": str(hub_dir), "HF_DATASETS_CACHE": str(datasets_dir),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = ("import sys; from rehearsal.hub_cache import _prepare_cache; "
            "print(_prepare_cache(*sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, str(hub_dir), str(datasets_dir), repo.repo_id, repo.revision],
                         env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"building the datasets cache of {repo.repo_id} failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])
