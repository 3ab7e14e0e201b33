"""Where a notebook runs (Colab or not), where it writes, and the repository's public address.

REPO is the single place that holds the repository's address: the Colab badges in README.md and the
notebooks, and the notebooks' install cells, are written from it. To publish under another address, a
maintainer runs `python tools/repo.py --set-repo OWNER/NAME` (it rewrites README.md and notebooks/*.ipynb).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = "ipa-text-aware/ip-adapter-text-aware"  # GitHub OWNER/NAME; change with tools/repo.py --set-repo
BRANCH = "main"
OUTPUT_ENV = "IPA_OUTPUT_ROOT"
DRIVE_MOUNT = "/content/drive"
DRIVE_FOLDER = "MyDrive/ip-adapter-text-aware"


def in_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


def install_command(repo: str = REPO) -> str:
    """The pip command the notebooks' setup cells run in Colab (torch and other preinstalled packages
    already meet the lower bounds, so only this package and torchmetrics get installed)."""
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

    def describe(self) -> str:
        where = "Google Drive" if self.drive else ("this Colab session's disk (lost when it ends)" if self.colab
                                                  else "local disk")
        return f"Outputs: {self.output_root} ({where})"


def output_root(*, colab: bool, drive: bool, drive_mount: str = DRIVE_MOUNT) -> Path:
    """$IPA_OUTPUT_ROOT if set; else Drive when mounted; else /content/outputs in Colab; else
    <checkout>/outputs (or ./outputs outside a checkout)."""
    if os.environ.get(OUTPUT_ENV):
        return Path(os.environ[OUTPUT_ENV])
    if drive:
        return Path(drive_mount) / DRIVE_FOLDER / "outputs"
    if colab:
        return Path("/content/outputs")
    return (repo_root() or Path.cwd()) / "outputs"


def setup(mount_drive: bool = True, *, drive_mount: str = DRIVE_MOUNT, quiet: bool = True) -> Env:
    """Call once at the top of a notebook: mounts Google Drive in Colab when asked (so checkpoints and
    results survive a disconnect), picks the output root, and quiets library log spam."""
    colab = in_colab()
    drive = False
    if colab and mount_drive:
        from google.colab import drive as gdrive  # only importable in Colab

        gdrive.mount(drive_mount)
        drive = True
    if quiet:
        quiet_libraries()
    env = Env(colab=colab, drive=drive, output_root=output_root(colab=colab, drive=drive, drive_mount=drive_mount))
    env.output_root.mkdir(parents=True, exist_ok=True)
    print(env.describe())
    return env


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
