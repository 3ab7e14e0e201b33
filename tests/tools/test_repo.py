"""tools/repo.py: the repository's address rewritten everywhere it appears (badges, install cells, REPO)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))

from repo import colab_badge, repo_urls, set_repo  # noqa: E402

from helpers.support.env import install_command  # noqa: E402


def test_set_repo_rewrites_badges_and_install_urls(tmp_path):
    (tmp_path / "notebooks").mkdir()
    nb = tmp_path / "notebooks" / "01_x.ipynb"
    nb.write_text(colab_badge("01_x.ipynb") + "\n" + install_command())
    (tmp_path / "README.md").write_text(colab_badge("01_x.ipynb") + " see github.com/other/repo/blob/x")
    changed = set_repo("me/fork", tmp_path)
    assert set(changed) == {nb, tmp_path / "README.md"}
    assert repo_urls(nb.read_text()) == {"me/fork"}
    assert repo_urls((tmp_path / "README.md").read_text()) == {"me/fork", "other/repo"}
    with pytest.raises(ValueError, match="OWNER/NAME"):
        set_repo("not a repo", tmp_path)
