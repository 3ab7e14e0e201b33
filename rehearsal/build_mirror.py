"""Build, offline, a local mirror of every Hub repo the `full` profile names, as a Hugging Face cache.

    python -m rehearsal.build_mirror [DIR]      (default: $IPA_MIRROR_DIR, else ~/.cache/ipa-text-aware/mirror)

DIR/hub is a hub cache (HF_HUB_CACHE) and DIR/datasets a datasets cache (HF_DATASETS_CACHE), filled as an
earlier online run would have left them: real repo ids, revisions, subfolders, file names and config files,
random weights at the real shapes, a small synthetic dataset. DIR/README.md says what is real and what is
not. Point the caches at it and turn the libraries' offline mode on (`./run.sh rehearse` does), and every
`from_pretrained`, `hf_hub_download` and `load_dataset` call of the project runs unchanged against it.

The build goes to a temporary folder that is renamed to DIR when complete; a complete DIR is reused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python rehearsal/build_mirror.py DIR
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "rehearsal"

from . import dataset, models, readme  # noqa: E402
from .hub_cache import RepoWriter, write_datasets_cache  # noqa: E402
from .vocab import bert_vocab_standin, clip_bpe  # noqa: E402

MIRROR_VERSION = "v3"  # bump when the mirror's content changes, so caches are rebuilt  (v3: CLIPSeg)
MIRROR_ENV = "IPA_MIRROR_DIR"

# Revisions: the 40-hex commit each repo's refs/main points at. Real ones where a public cache path shows
# them (they only name the snapshot folder; nothing checks them offline).
REVISIONS = {
    models.SD15: "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    models.IP_ADAPTER: "018e402774aeeddd60609b4ecdb7e298259dc729",
    models.CLIP_L: "32bd64288804d66eefd0ccbe215aa642df71cc41",
    models.DINO: "abe3b354cb6a9b6f146096b14a4a9d7eecbcb4bd",
    models.BLIP: "82a37760796d32b1411fe092ab5d4e227313294b",
    models.CLIPSEG: "0c1d4d4d0c5e7c2a9bd3a4c1b0e4f2a7d9c3e5b1",  # made up: the real one could not be checked offline
    dataset.REPO_ID: "68b7f66000000000000000000000000000000000",  # real short hash 68b7f66, padded
}


def default_dir() -> Path:
    return Path(os.environ.get(MIRROR_ENV) or Path.home() / ".cache" / "ipa-text-aware" / "mirror")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout carries only the mirror's path (run.sh reads it)


def build_mirror(target: str | os.PathLike | None = None, *, log=_log) -> Path:
    """Build the mirror into `target` (see module docstring) unless a complete one is there; return it."""
    target = Path(target) if target is not None else default_dir()
    marker = target / "COMPLETE"
    if marker.is_file() and marker.read_text().split()[:1] == [MIRROR_VERSION]:
        log(f"mirror: reusing {target}")
        return target
    if target.exists() and not marker.is_file():
        raise FileExistsError(f"{target} exists but is not a mirror built by this script: remove it or choose "
                              f"another folder (${MIRROR_ENV})")
    if target.exists():
        log(f"mirror: {target} is an older mirror ({marker.read_text().split()[0]}); building {MIRROR_VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".building-", dir=target.parent))
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    try:
        hub, downloads = tmp / "hub", tmp / ".downloads"

        def step(name, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            times[name] = time.perf_counter() - t
            log(f"mirror: {name} ({times[name]:.0f} s)")
            return out

        vocab, merges, vocab_source = step("CLIP vocabulary", clip_bpe, downloads)
        repos = {rid: RepoWriter(hub, rid, rev, "dataset" if rid == dataset.REPO_ID else "model")
                 for rid, rev in REVISIONS.items()}
        step(models.SD15 + " (+ IP-Adapter Plus file)", models.build_sd15, repos[models.SD15], vocab, merges,
             repos[models.IP_ADAPTER])
        step(models.IP_ADAPTER + " image encoder", models.build_ip_adapter_encoder, repos[models.IP_ADAPTER])
        step(models.CLIP_L, models.build_clip_l, repos[models.CLIP_L], vocab, merges)
        step(models.DINO, models.build_dino, repos[models.DINO])
        step(models.BLIP, models.build_blip, repos[models.BLIP], bert_vocab_standin(vocab))
        step(models.CLIPSEG, models.build_clipseg, repos[models.CLIPSEG], vocab, merges)
        n_rows = step(dataset.REPO_ID, dataset.build_dataset, repos[dataset.REPO_ID])
        files = {rid: step(f"content-addressing {rid}", repo.finish) for rid, repo in repos.items()}
        step("datasets cache", write_datasets_cache, tmp / "datasets", repos[dataset.REPO_ID])
        shutil.rmtree(downloads, ignore_errors=True)
        for lock in (tmp / "datasets").glob("*.lock"):  # named after the temporary folder
            lock.unlink()
        times["total"] = time.perf_counter() - t_all
        (tmp / "README.md").write_text(readme.render(tmp, files, REVISIONS, vocab_source=vocab_source,
                                                     n_rows=n_rows, times=times))
        (tmp / "COMPLETE").write_text(f"{MIRROR_VERSION} built in {times['total']:.0f} s\n")
        old = target.with_name(target.name + ".old")
        if target.exists():  # an older version: swap it out, then delete it
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:  # another build finished first: keep theirs
            if not (target / "COMPLETE").is_file():
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"mirror: built {target} in {times['total']:.0f} s ({readme.disk_size(target) / 2**30:.1f} GiB)")
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rehearsal.build_mirror", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", help=f"where to build (default ${MIRROR_ENV}, else ~/.cache/ipa-text-aware/mirror)")
    args = ap.parse_args(argv)
    print(build_mirror(args.dir))


if __name__ == "__main__":
    main()
