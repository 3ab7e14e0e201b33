"""Where a notebook runs (Colab, Kaggle or elsewhere), where it writes, and the repository's public address.

REPO is the single place that holds the repository's address: the Colab badges in README.md and the
notebooks, and the notebooks' install cells, are written from it. To publish under another address, a
maintainer runs `python tools/repo.py --set-repo OWNER/NAME` (it rewrites README.md and notebooks/*.ipynb).

Kaggle keeps /kaggle/working as the notebook's output when a version is saved, and brings a saved version's
output back read-only under /kaggle/input/. Each Kaggle notebook has a /kaggle/working of its own, so this is
also how one notebook there gets an earlier one's outputs (04 gets 01's data and 03's runs): `setup(resume_from=...)`
(or $IPA_RESUME_FROM; several names comma-separated) copies such earlier outputs into this session's output
folder, only the files not there yet.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import replacing
from .disk import check_space
from .lock import LOCK_FILE, TEMPORARY_MARKERS

REPO = "ipa-text-aware/ip-adapter-text-aware"  # GitHub OWNER/NAME; change with tools/repo.py --set-repo
BRANCH = "main"
OUTPUT_ENV = "IPA_OUTPUT_ROOT"
DRIVE_MOUNT = "/content/drive"
DRIVE_FOLDER = "MyDrive/ip-adapter-text-aware"
KAGGLE_ENV = "KAGGLE_KERNEL_RUN_TYPE"  # set in every Kaggle kernel ("Interactive" or "Batch")
KAGGLE_ROOT = Path("/kaggle")  # working/ (writable, kept with a saved version) and input/ (read-only)
RESUME_ENV = "IPA_RESUME_FROM"
RESUMED_FILE = ".resumed.json"  # in the output root: what was copied from where (never copied itself)


def in_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


def in_kaggle() -> bool:
    """True inside a Kaggle notebook (or script) kernel."""
    return KAGGLE_ENV in os.environ


def install_command(repo: str = REPO) -> str:
    """The pip command the notebooks' setup cells run in Colab and on Kaggle (in Colab, torch and the other
    preinstalled packages already meet the lower bounds, so only this package and torchmetrics get installed;
    pip upgrades whatever a Kaggle image has older)."""
    return f'pip install -q "ipa-text-aware @ git+https://github.com/{repo}.git@{BRANCH}"'


def repo_root(start: Path | None = None) -> Path | None:
    """The checkout this runs in (the folder with this project's pyproject.toml), if any."""
    for folder in [start or Path.cwd(), *(start or Path.cwd()).parents]:
        toml = folder / "pyproject.toml"
        if toml.is_file() and 'name = "ipa-text-aware"' in toml.read_text():
            return folder
    return None


@dataclass
class Env:
    colab: bool
    drive: bool  # outputs go to Google Drive (they survive the Colab session)
    output_root: Path
    kaggle: bool = False

    def describe(self) -> str:
        where = ("Google Drive" if self.drive else
                 f"Kaggle ({KAGGLE_ROOT / 'working'}: kept as the notebook's output when you save a version)"
                 if self.kaggle else "this Colab session's disk (lost when it ends)" if self.colab else "local disk")
        return f"Outputs: {self.output_root} ({where})"


def output_root(*, colab: bool, drive: bool, drive_mount: str = DRIVE_MOUNT, kaggle: bool | None = None) -> Path:
    """$IPA_OUTPUT_ROOT if set; else Drive when mounted; else /kaggle/working/outputs on Kaggle (kaggle=None:
    found out here); else /content/outputs in Colab; else <checkout>/outputs (or ./outputs outside a checkout)."""
    if os.environ.get(OUTPUT_ENV):
        return Path(os.environ[OUTPUT_ENV])
    if drive:
        return Path(drive_mount) / DRIVE_FOLDER / "outputs"
    if in_kaggle() if kaggle is None else kaggle:
        return KAGGLE_ROOT / "working" / "outputs"
    if colab:
        return Path("/content/outputs")
    return (repo_root() or Path.cwd()) / "outputs"


def setup(mount_drive: bool = True, *, drive_mount: str = DRIVE_MOUNT, quiet: bool = True,
          resume_from: str | os.PathLike | list | None = None) -> Env:
    """Call once at the top of a notebook: mounts Google Drive in Colab when asked (so checkpoints and
    results survive a disconnect; Kaggle has no Drive, so mount_drive is ignored there), picks the output
    root, quiets library log spam, and copies earlier outputs in when resume_from (default $IPA_RESUME_FROM)
    names them, comma-separated (see resume; the first named wins where two hold the same file)."""
    kaggle = in_kaggle()
    colab = in_colab() and not kaggle
    drive = False
    if colab and mount_drive:
        from google.colab import drive as gdrive  # only importable in Colab

        gdrive.mount(drive_mount)
        drive = True
    if quiet:
        quiet_libraries()
    env = Env(colab=colab, drive=drive, kaggle=kaggle,
              output_root=output_root(colab=colab, drive=drive, drive_mount=drive_mount, kaggle=kaggle))
    env.output_root.mkdir(parents=True, exist_ok=True)
    if kaggle and mount_drive:
        print("Kaggle has no Google Drive: MOUNT_DRIVE is ignored here. To keep the outputs, save a version "
              "(README, Running in Colab > On Kaggle).")
    print(env.describe())
    names = resume_from if isinstance(resume_from, (list, tuple)) else \
        str(resume_from or os.environ.get(RESUME_ENV, "")).split(",")
    for name in filter(None, (str(n).strip() for n in names)):
        resume(name, env.output_root)
    return env


# --------------------------------------------------------------------------------------------------
# Resuming from an earlier output (a saved Kaggle version's, under /kaggle/input)
# --------------------------------------------------------------------------------------------------


def find_saved_output(name) -> Path:
    """The outputs folder an earlier session saved. `name`: a path, or the name of a folder under
    /kaggle/input (a saved notebook's output mounts at /kaggle/input/<slug>/ or, on newer Kaggle,
    /kaggle/input/notebooks/<user>/<slug>/). Its outputs/ subfolder if it has one, else the folder itself."""
    inputs = KAGGLE_ROOT / "input"
    path = Path(name).expanduser()
    found = [path] if path.is_absolute() or path.is_dir() else \
        [inputs / name, *sorted(inputs.glob(f"*/{name}")), *sorted(inputs.glob(f"*/*/{name}"))]
    folder = next((p for p in found if p.is_dir()), None)
    if folder is None:
        saved = sorted({str(p.parent) for pattern in ("*/outputs", "*/*/*/outputs") for p in inputs.glob(pattern)})
        raise FileNotFoundError(
            f"{RESUME_ENV} / resume_from = {str(name)!r}: no such folder ({', '.join(map(str, found))}). "
            + (f"Saved outputs found under {inputs}: {', '.join(saved)}. " if saved else
               f"On Kaggle, add your notebook's saved version as input first (Add Input > Your Work), then use "
               f"the folder it shows under {inputs}. ")
            + f"Unset {RESUME_ENV} (or resume_from=None) to start without it.")
    return folder / "outputs" if (folder / "outputs").is_dir() else folder


def _files(n: int) -> str:
    return f"{n} file" + ("" if n == 1 else "s")


def _copied_here(path: Path) -> bool:
    """Whether a file of an earlier output is copied: not a lock, a temporary or the record of a resume."""
    name = path.name
    temporary = name.startswith(".") and any(m in name for m in TEMPORARY_MARKERS)
    return name not in (LOCK_FILE, RESUMED_FILE) and not temporary


def resume(source, out_root) -> list[Path]:
    """Copy an earlier output (find_saved_output(source)) into out_root: every file that out_root does not
    have yet, under the same relative path; a file already there is never replaced, whatever its age. Each file
    is copied whole or not at all (a temporary, then a rename), with its modification time and without its
    read-only mode. Done once per source: out_root/.resumed.json records the sources copied, so a later setup
    of the same session (after FRESH_START deleted a run, say) does not bring the old files back. Prints what
    it copied. Returns the paths written, relative to out_root."""
    src, out = find_saved_output(source), Path(out_root)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"resume_from = {str(source)!r} is {src}, inside this session's own output folder {out}: "
                         "name the earlier output (a folder under /kaggle/input), not this one")
    record = out / RESUMED_FILE
    done = json.loads(record.read_text()) if record.is_file() else {}
    if str(src) in done:
        print(f"Resume: {src} was already copied into {out} ({_files(done[str(src)])}); nothing copied again.")
        return []
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file() and _copied_here(p))
    missing = [f for f in files if not (out / f).exists()]
    check_space(out, sum((src / f).stat().st_size for f in missing), what=f"the files to copy from {src}")
    for f in missing:
        with replacing(out / f) as tmp:  # a cut copy never looks like a whole file
            shutil.copyfile(src / f, tmp)
            stat = (src / f).stat()
            os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with replacing(record) as tmp:
        tmp.write_text(json.dumps({**done, str(src): len(missing)}))  # {source folder: files copied}
    folders = {}  # files copied per folder, two levels deep (data/, runs/text_aware/, ...)
    for f in missing:
        key = "/".join(f.parts[:-1][:2]) + "/" if len(f.parts) > 1 else "./"
        folders[key] = folders.get(key, 0) + 1
    where, kept = ", ".join(f"{k} ({n})" for k, n in folders.items()), len(files) - len(missing)
    print(f"Resume: copied {_files(len(missing))} from {src} into {out}" + (f": {where}" if missing else "")
          + (f"; kept the {_files(kept)} already there as they are" if kept else "") + ".")
    return missing


# The library messages a notebook reader can do nothing about, each harmless, each with its reason; every other
# warning still shows. (logger name, words of the message)
HARMLESS_NOISE = (
    # diffusers' own _load_ip_adapter_weights calls .to(dtype=self.dtype), and ModelMixin.to warns on any dtype,
    # even when no module is to be kept in fp32 (diffusers 0.39-0.42)
    ("diffusers.models.modeling_utils", "should be kept in float32: []"),
    # without torchvision (not on Colab, where it is installed) transformers' image processors fall back to
    # their PIL versions, the ones helpers.evaluate.metrics picks on purpose
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)
# diffusers passes hf_hub_download an argument that huggingface_hub deprecated (its configuration_utils)
HARMLESS_WARNINGS = ("The `local_dir_use_symlinks` argument is deprecated",)


class _HarmlessNoise(logging.Filter):
    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def quiet_libraries() -> None:
    """The one place that quiets the libraries: the model-loading progress bars of diffusers and transformers
    go (training, denoising and data bars stay), and HARMLESS_NOISE / HARMLESS_WARNINGS are dropped. Calling
    it again adds nothing."""
    import importlib
    import warnings

    for mod in ("diffusers", "transformers"):
        try:
            importlib.import_module(f"{mod}.utils.logging").disable_progress_bar()
        except ImportError:
            continue
    for name, words in HARMLESS_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HarmlessNoise) and f.words == words for f in logger.filters):
            logger.addFilter(_HarmlessNoise(words))
    for words in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(words), category=UserWarning)
