"""helpers.support.env: the Colab-only branches (install, Drive, output root), tested by faking Colab."""
import shlex
import sys
import types
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from helpers.support.env import (
    REPO,
    DRIVE_FOLDER,
    OUTPUT_ENV,
    in_colab,
    install_command,
    output_root,
    setup,
)

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """A stand-in `google.colab` whose drive.mount records the call and creates MyDrive."""
    mounted = []

    def mount(path):
        mounted.append(path)
        (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)

    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delenv(OUTPUT_ENV, raising=False)
    return mounted


def test_outside_colab_outputs_go_to_the_checkout(monkeypatch):
    monkeypatch.delenv(OUTPUT_ENV, raising=False)
    assert not in_colab()
    root = output_root(colab=False, drive=False)
    assert root == Path(__file__).parents[2] / "outputs"


def test_colab_mounts_drive_and_writes_there(fake_colab, tmp_path, capsys):
    e = setup(mount_drive=True, drive_mount=str(tmp_path / "drive"), quiet=False)
    assert fake_colab == [str(tmp_path / "drive")]
    assert e.colab and e.drive and e.output_root == tmp_path / "drive" / DRIVE_FOLDER / "outputs"
    assert e.output_root.is_dir() and "Google Drive" in capsys.readouterr().out


def test_colab_without_drive_uses_session_disk(fake_colab):
    assert in_colab()
    assert output_root(colab=True, drive=False) == Path("/content/outputs")
    assert fake_colab == []


def test_output_root_variable_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(OUTPUT_ENV, str(tmp_path))
    assert output_root(colab=True, drive=True) == tmp_path


def _run_setup_cell(nb, monkeypatch, returncode=0):
    """Run a notebook's setup cell as IPython would, with pip recorded (and answering `returncode`), not run."""
    import subprocess

    import nbformat

    cell = next(c for c in nbformat.read(nb, 4).cells if c.cell_type == "code")
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, "pip's own output", "ERROR: could not resolve host")

    monkeypatch.setattr(subprocess, "run", fake_run)
    exec(TransformerManager().transform_cell(cell.source), {})
    return calls


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_installs_only_in_colab(nb, fake_colab, monkeypatch):
    calls = _run_setup_cell(nb, monkeypatch)
    assert calls == [[sys.executable, "-m", *shlex.split(install_command())]]
    monkeypatch.delitem(sys.modules, "google.colab")
    assert _run_setup_cell(nb, monkeypatch) == []


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_a_failed_install_stops_the_notebook_naming_the_repository(nb, fake_colab, monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="Installing this project's helpers failed") as e:
        _run_setup_cell(nb, monkeypatch, returncode=1)
    assert REPO in str(e.value) and "could not resolve host" in capsys.readouterr().out


def test_quiet_libraries_drops_only_the_named_harmless_noise(text_aware):
    """diffusers' own .to(dtype) when it attaches an IP-Adapter warns about an empty list of fp32 modules:
    quiet_libraries drops exactly the messages it names, each once, and every other warning still shows."""
    import logging
    import warnings

    from helpers.support.env import HARMLESS_NOISE, quiet_libraries

    class Keep(logging.Handler):  # on the loggers themselves: diffusers' and transformers' do not propagate
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    quiet_libraries()
    quiet_libraries()  # idempotent: one filter per message
    loggers = [logging.getLogger(name) for name, _ in HARMLESS_NOISE]
    assert all(sum(getattr(f, "words", None) == words for f in logger.filters) == 1
               for logger, (_, words) in zip(loggers, HARMLESS_NOISE))
    keep, levels = Keep(), [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(keep)
        logger.setLevel(logging.WARNING)  # whatever verbosity another test or $DIFFUSERS_VERBOSITY left
    try:
        text_aware.unet.to(dtype=text_aware.unet.dtype)  # the call diffusers makes when it attaches an adapter
        loggers[0].warning("There are modules in X that should be kept in float32: ['norm']. Casting ...")
        loggers[1].warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `...Pil`")
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(keep)
            logger.setLevel(level)
    assert keep.messages == ["There are modules in X that should be kept in float32: ['norm']. Casting ..."]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries()
        warnings.warn("The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`.")
        warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]
