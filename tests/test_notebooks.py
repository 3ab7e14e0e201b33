"""The notebooks' shared conventions; nbval runs them end to end (see README's test command)."""
import re
import sys
from pathlib import Path

import nbformat
import pytest

from helpers.support.env import REPO, install_command

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from repo import colab_badge, repo_urls  # noqa: E402  (maintainers' tool)

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_data_prep", "02_architecture", "03_train", "04_sampling", "05_evaluation"]


def test_the_five_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, 4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_setup_and_config_cells(path):
    nb = nbformat.read(path, 4)
    assert nb.cells[0].cell_type == "markdown" and colab_badge(path.name) in nb.cells[0].source
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert install_command() in code[0] and 'if "google.colab" in sys.modules' in code[0]
    config = next((c for c in code if "#@param" in c), None)
    assert config is not None and "get_profile(" in config and "setup(" in config, "one config cell with form fields"
    assert sum("#@param" in c for c in code) and sum("get_profile(" in c for c in code) == 1


def test_readme_badges_point_at_repo_and_notebooks():
    readme = (ROOT / "README.md").read_text()
    assert repo_urls(readme) == {REPO}
    for name in EXPECTED:
        assert colab_badge(f"{name}.ipynb") in readme


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_tutorial_shape(path):
    """Prose between code cells, as in the style guide (about 1.5 markdown cells per code cell, at least 1)."""
    nb = nbformat.read(path, 4)
    md = sum(c.cell_type == "markdown" for c in nb.cells)
    code = sum(c.cell_type == "code" for c in nb.cells)
    assert md >= code - 1, f"{path.name}: {md} markdown cells for {code} code cells"
    assert re.search(r"you will need", nb.cells[0].source, re.I)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_form_fields_that_mean_the_profile_default_show_none(path):
    """A field handed to get_profile either shows None (a raw field: "the profile's value") or a value that is
    used as it is (a boolean); a string field is handed over as `FIELD or None`, so empty means the profile's.
    A 0 in an integer field would be a value now (Profile.replace keeps only None)."""
    config = next(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code" and "#@param" in c.source)
    fields = dict(re.findall(r"^([A-Z_]+) = (.+?)  #@param", config, re.M))
    call = config[config.index("get_profile("):]
    for name in re.findall(r"\w+=([A-Z_]+)\b(?! or None)", call):
        assert fields.get(name) in ("None", "True", "False"), f"{path.name}: {name} = {fields.get(name)}"
        if fields[name] == "None":
            assert re.search(rf'^{name} = None  #@param {{type:"raw"}}$', config, re.M), name
    for name in re.findall(r"\w+=([A-Z_]+) or None", call):
        assert fields.get(name, "").startswith('"'), f"{path.name}: {name} should be a string field"


@pytest.mark.parametrize("name", ["01_data_prep", "02_architecture", "04_sampling"])  # 03, 05: their own branches
def test_the_settings_cell_prints_what_the_notebook_costs_on_a_t4(name):
    """Issue 26: every notebook's settings cell prints its projected T4 minutes, from the counted budget, with
    the assumption (helpers.support.budget.notebook_projection), in one line."""
    from helpers.support.budget import notebook_projection

    config = next(c.source for c in nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", 4).cells
                  if c.cell_type == "code" and "#@param" in c.source)
    number = name[:2]
    assert re.search(rf'^print\(notebook_projection\("{number}"(, inference_steps=STEPS)?\)\.line\(\)\)', config, re.M)
    line = notebook_projection(number).line()
    assert "\n" not in line and line.startswith(f"Notebook {number} on a T4: about ") and "full profile" in line
