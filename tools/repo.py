"""Maintainers' tool: keep README and the notebooks in step with the repository's address (REPO in
helpers/support/env.py, its one home).

    python tools/repo.py                        # the address and the install command
    python tools/repo.py --set-repo OWNER/NAME  # rewrite every badge and install URL, and REPO itself
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers.support.env import BRANCH, REPO, install_command, repo_root  # noqa: E402


def colab_badge(notebook: str, repo: str = REPO) -> str:
    """Markdown for an "Open in Colab" badge of notebooks/<notebook>."""
    url = f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


# --------------------------------------------------------------------------------------------------

_REPO_URL = re.compile(r"(colab\.research\.google\.com/github/|github\.com/)([\w.-]+/[\w.-]+?)(/blob/|\.git)")


def set_repo(new: str, root: Path | None = None, *, old: str = REPO) -> list[Path]:
    """Rewrite every badge and install URL in README.md and notebooks/*.ipynb (and REPO in helpers/support/env.py)
    from `old` to `new`. Returns the files changed."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", new):
        raise ValueError(f"expected OWNER/NAME, got {new!r}")
    root = root or repo_root() or Path.cwd()
    files = [root / "README.md", *sorted((root / "notebooks").glob("*.ipynb")),
             root / "helpers" / "support" / "env.py"]
    changed = []
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text()
        new_text = text.replace(f'REPO = "{old}"', f'REPO = "{new}"') if f.suffix == ".py" else \
            _REPO_URL.sub(lambda m: m.group(1) + (new if m.group(2) == old else m.group(2)) + m.group(3), text)
        if new_text != text:
            f.write_text(new_text)
            changed.append(f)
    return changed


def repo_urls(text: str) -> set[str]:
    """Repository addresses found in badge and install URLs of a text."""
    return {m.group(2) for m in _REPO_URL.finditer(text)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python tools/repo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set-repo", metavar="OWNER/NAME", help="rewrite badges and install cells to this repository")
    args = ap.parse_args(argv)
    if args.set_repo:
        for f in set_repo(args.set_repo):
            print(f"updated {f}")
    else:
        print(f"repository: {REPO}\ninstall:    {install_command()}")


if __name__ == "__main__":
    main()
