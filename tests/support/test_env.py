"""helpers.support.env: the Colab and Kaggle branches (install, Drive, output root, resuming from a saved
Kaggle output), tested by faking Colab and Kaggle."""
import json
import os
import shlex
import shutil
import sys
import types
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

import helpers.support.env as env_module
from helpers.support.env import (
    REPO,
    DRIVE_FOLDER,
    KAGGLE_ENV,
    OUTPUT_ENV,
    RESUME_ENV,
    RESUMED_FILE,
    find_saved_output,
    in_colab,
    in_kaggle,
    install_command,
    output_root,
    resume,
    setup,
)
from helpers.support.lock import LOCK_FILE

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
    monkeypatch.delenv(KAGGLE_ENV, raising=False)
    return mounted


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    """A Kaggle kernel: its environment variable set, /kaggle (working/ and a read-only input/) under tmp_path,
    no google.colab. Returns the stand-in for /kaggle."""
    root = tmp_path / "kaggle"
    (root / "working").mkdir(parents=True)
    (root / "input").mkdir()
    monkeypatch.setattr(env_module, "KAGGLE_ROOT", root)
    monkeypatch.setenv(KAGGLE_ENV, "Interactive")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    for name in (OUTPUT_ENV, RESUME_ENV):
        monkeypatch.delenv(name, raising=False)
    return root


def test_outside_colab_outputs_go_to_the_checkout(monkeypatch):
    monkeypatch.delenv(OUTPUT_ENV, raising=False)
    monkeypatch.delenv(KAGGLE_ENV, raising=False)
    assert not in_colab() and not in_kaggle()
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


def _run_setup_cell(nb, monkeypatch, returncode=0, stderr="ERROR: could not resolve host", scope=None):
    """Run a notebook's setup cell as IPython would (in `scope`), with pip recorded (and answering `returncode`
    and `stderr`), not run."""
    import subprocess

    import nbformat

    cell = next(c for c in nbformat.read(nb, 4).cells if c.cell_type == "code")
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, "pip's own output", stderr)

    monkeypatch.setattr(subprocess, "run", fake_run)
    exec(TransformerManager().transform_cell(cell.source), {} if scope is None else scope)
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


# --------------------------------------------------------------------------------------------------
# Kaggle
# --------------------------------------------------------------------------------------------------


def test_kaggle_writes_to_working_and_leaves_drive_alone(fake_colab, fake_kaggle, monkeypatch, capsys):
    """On Kaggle, outputs go to /kaggle/working/outputs; Drive is never mounted, even where google.colab imports."""
    monkeypatch.setitem(sys.modules, "google.colab", sys.modules["google"].colab)  # importable; still not used
    assert in_kaggle() and output_root(colab=False, drive=False) == fake_kaggle / "working" / "outputs"  # the CLIs'
    e = setup(mount_drive=True, quiet=False)
    out = capsys.readouterr().out
    assert fake_colab == [] and e.kaggle and not e.drive and not e.colab
    assert e.output_root == fake_kaggle / "working" / "outputs" and e.output_root.is_dir()
    assert out.count("MOUNT_DRIVE is ignored") == 1
    assert (f"Outputs: {e.output_root} (Kaggle ({fake_kaggle / 'working'}: kept as the notebook's output when you "
            "save a version))") in out
    setup(mount_drive=False, quiet=False)
    assert "MOUNT_DRIVE" not in capsys.readouterr().out


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_installs_on_kaggle_and_names_the_internet_switch(nb, fake_kaggle, monkeypatch):
    assert _run_setup_cell(nb, monkeypatch) == [[sys.executable, "-m", *shlex.split(install_command())]]
    with pytest.raises(RuntimeError, match=r"pip could not reach the network\. On Kaggle, switch on the notebook's "
                                           r"Settings > Internet \(Kaggle may first ask you to verify your phone "
                                           r"number\), then run this cell again") as e:
        _run_setup_cell(nb, monkeypatch, returncode=1, stderr="fatal: unable to access 'https://github.com/x/': "
                                                            "Could not resolve host: github.com")
    assert REPO in str(e.value)
    with pytest.raises(RuntimeError, match=r"words are above\): pip install .*\. On Kaggle, switch on") as e:
        _run_setup_cell(nb, monkeypatch, returncode=1, stderr="ERROR: pyproject.toml: invalid")
    assert "could not reach" not in str(e.value)  # it was not the network


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_settings_cell_runs_unchanged_on_kaggle_and_resumes(nb, fake_kaggle, monkeypatch, capsys):
    """The install cell, then the settings cell as committed, on Kaggle with $IPA_RESUME_FROM naming a saved version's
    output: the Kaggle output root, with the saved files copied in."""
    import nbformat

    saved = fake_kaggle / "input" / "notebooks" / "me" / "ipa-01" / "outputs"
    (saved / "data").mkdir(parents=True)
    (saved / "data" / "prepared.json").write_text('{"source": "saved"}')
    monkeypatch.setenv(RESUME_ENV, "ipa-01")
    scope = {}
    _run_setup_cell(nb, monkeypatch, scope=scope)
    settings = next(c.source for c in nbformat.read(nb, 4).cells if c.cell_type == "code" and "#@param" in c.source)
    exec(TransformerManager().transform_cell(settings), scope)
    assert scope["env"].kaggle and scope["env"].output_root == fake_kaggle / "working" / "outputs"
    assert (scope["env"].output_root / "data" / "prepared.json").read_text() == '{"source": "saved"}'
    assert f"Resume: copied 1 file from {saved} into {scope['env'].output_root}: data/ (1)." in capsys.readouterr().out


def _saved_output(root: Path) -> Path:
    """A saved version's output as Kaggle mounts it: read-only files, with a lock and a temporary left in it."""
    saved = root / "input" / "notebooks" / "me" / "ipa-series" / "outputs"
    files = {"data/prepared.json": "{}", "data/train/part-0.parquet": "rows", "runs/text_aware/loss_log.csv": "old log",
             "runs/text_aware/checkpoints/step-4/adapter.safetensors": "weights", "eval/results.csv": "old rows",
             f"runs/text_aware/{LOCK_FILE}": "{}", "eval/.results.csv.tmp-123": "half"}
    for name, text in files.items():
        (saved / name).parent.mkdir(parents=True, exist_ok=True)
        (saved / name).write_text(text)
        os.utime(saved / name, (1_000_000, 1_000_000))
        (saved / name).chmod(0o444)
    return saved


def test_resume_copies_only_what_is_missing_and_never_replaces(fake_kaggle, capsys):
    saved, out = _saved_output(fake_kaggle), fake_kaggle / "working" / "outputs"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "results.csv").write_text("newer rows")  # this session's own, newer
    (out / "runs" / "text_aware").mkdir(parents=True)
    (out / "runs" / "text_aware" / "loss_log.csv").write_text("this session's log")
    os.utime(out / "runs" / "text_aware" / "loss_log.csv", (1, 1))  # older than the saved one: still kept
    copied = resume("ipa-series", out)
    assert sorted(map(str, copied)) == ["data/prepared.json", "data/train/part-0.parquet",
                                        "runs/text_aware/checkpoints/step-4/adapter.safetensors"]
    for f in copied:
        assert (out / f).read_bytes() == (saved / f).read_bytes()
        assert (out / f).stat().st_mtime == 1_000_000 and (out / f).stat().st_mode & 0o200  # its time, not its mode
    assert (out / "eval" / "results.csv").read_text() == "newer rows"
    assert (out / "runs" / "text_aware" / "loss_log.csv").read_text() == "this session's log"
    assert not (out / "runs" / "text_aware" / LOCK_FILE).exists()  # neither a lock nor a temporary comes along
    assert not (out / "eval" / ".results.csv.tmp-123").exists()
    said = capsys.readouterr().out
    assert (f"Resume: copied 3 files from {saved} into {out}: data/ (1), data/train/ (1), runs/text_aware/ (1); "
            "kept the 2 files already there as they are.") in said
    # once per source: a run deleted afterwards (FRESH_START) is not brought back by a later setup
    shutil.rmtree(out / "runs" / "text_aware" / "checkpoints")
    assert resume("ipa-series", out) == [] and "already copied" in capsys.readouterr().out
    assert not (out / "runs" / "text_aware" / "checkpoints").exists()
    assert (out / RESUMED_FILE).is_file()


def test_setup_resumes_from_several_saved_outputs_the_first_named_winning(fake_kaggle, monkeypatch, capsys):
    """Each Kaggle notebook has its own /kaggle/working: 04 takes 01's data and 03's runs, named in one setting."""
    first, second = fake_kaggle / "input" / "ipa-01" / "outputs", fake_kaggle / "input" / "notebooks" / "me" / "ipa-03"
    for folder, text in ((first, "from 01"), (second, "from 03")):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "prepared.json").write_text(text)
    (second / "runs" / "text_aware").mkdir(parents=True)
    (second / "runs" / "text_aware" / "adapter.safetensors").write_text("weights")
    monkeypatch.setenv(RESUME_ENV, "ipa-01, ipa-03")
    out = setup(mount_drive=False, quiet=False).output_root
    assert (out / "data" / "prepared.json").read_text() == "from 01"  # never replaced by the second
    assert (out / "runs" / "text_aware" / "adapter.safetensors").read_text() == "weights"
    assert json.loads((out / RESUMED_FILE).read_text()) == {str(first): 1, str(second): 1}
    capsys.readouterr()
    setup(mount_drive=False, quiet=False)  # the settings cell run again: nothing copied again
    assert capsys.readouterr().out.count("already copied") == 2


def test_an_interrupted_resume_leaves_no_half_file_and_finishes_when_run_again(fake_kaggle, monkeypatch):
    saved, out = _saved_output(fake_kaggle), fake_kaggle / "working" / "outputs"
    real, done = shutil.copyfile, []

    def cut_short(src, dst):
        if done:  # the second file: the session ends half way through it
            Path(dst).write_text("ha")
            raise KeyboardInterrupt
        done.append(real(src, dst))

    monkeypatch.setattr(shutil, "copyfile", cut_short)
    with pytest.raises(KeyboardInterrupt):
        resume(str(saved), out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["data/prepared.json"]  # whole; the cut one left nothing, and no record of a finished resume
    monkeypatch.setattr(shutil, "copyfile", real)
    assert len(resume(str(saved), out)) == 4 and (out / "data" / "train" / "part-0.parquet").read_text() == "rows"


def test_the_saved_output_is_found_by_name_or_path_and_a_wrong_name_lists_the_saved_ones(fake_kaggle):
    saved = _saved_output(fake_kaggle)
    older = fake_kaggle / "input" / "ipa-old" / "outputs"  # the older layout: /kaggle/input/<slug>/
    older.mkdir(parents=True)
    assert find_saved_output("ipa-series") == saved and find_saved_output("ipa-old") == older
    assert find_saved_output(saved.parent) == saved and find_saved_output(saved) == saved
    with pytest.raises(FileNotFoundError, match=rf"resume_from = 'ipa-seriez': no such folder .*Saved outputs found "
                                                rf"under {fake_kaggle / 'input'}: .*ipa-old, .*ipa-series\. Unset"):
        find_saved_output("ipa-seriez")
    out = fake_kaggle / "working" / "outputs"
    out.mkdir()
    with pytest.raises(ValueError, match="inside this session's own output folder"):
        resume(out, out)


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
