"""What a name the user gives stands for: a local path, or a Hugging Face Hub repo (and a path inside it).

Every model, adapter and dataset in this project is named by one string, and this module is the one place
that reads such a string:

    looks_local("./runs/text_aware")                 True: can only be a path on this machine
    is_hub_id("h94/IP-Adapter")                      True: a valid repo id 'owner/name' (and no such local path)
    split_hub_name("h94/IP-Adapter/models/x.bin")    ('h94/IP-Adapter', 'models/x.bin'); None if it cannot be one
    split_hub_file("h94/IP-Adapter/models/x.bin")    ('h94/IP-Adapter', 'models', 'x.bin'); ValueError if not a file's
    image_encoder_next_to(ip_adapter)                where an IP-Adapter file's image encoder lies by default

A Hub name is 'owner/repo' followed by an optional path inside the repo. Existing local paths always win
over Hub names, as in `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path


def looks_local(name) -> bool:
    """True for a name that can only be a local path: absolute, relative ('./', '../'), home ('~'), with a
    backslash or a colon (Windows paths, URLs), or a bare file name with an extension ('adapter.safetensors')."""
    text = str(name)
    return (text.startswith(("/", ".", "~")) or "\\" in text or ":" in text
            or ("/" not in text and Path(text).suffix != ""))


def _valid_repo_id(repo: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def split_hub_name(name) -> tuple[str, str] | None:
    """'owner/repo' -> ('owner/repo', ''); 'owner/repo/sub/file' -> ('owner/repo', 'sub/file'); None for a
    name that cannot be a Hub name (it looks local, has no 'owner/repo' part, or the repo id is invalid)."""
    text = str(name).strip()
    if not text or looks_local(text):
        return None
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not _valid_repo_id("/".join(parts[:2])):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def is_hub_id(name) -> bool:
    """True for exactly 'owner/name', a valid Hub repo id that is not an existing local path."""
    hub = split_hub_name(name)
    return hub is not None and hub[1] == "" and not Path(str(name)).expanduser().exists()


def split_hub_file(name) -> tuple[str, str, str]:
    """'owner/repo/sub/folder/file' -> ('owner/repo', 'sub/folder', 'file') ('' for no subfolder); ValueError
    for a name that is neither that nor, as the caller checks first, an existing local file."""
    hub = split_hub_name(name)
    if hub is None or not hub[1]:
        raise ValueError(f"{str(name)!r} is neither an existing local file nor 'hub_owner/repo/subfolder/file'")
    sub, _, file = hub[1].rpartition("/")
    return hub[0], sub, file


def image_encoder_next_to(ip_adapter) -> tuple[str, str]:
    """(repo or folder, subfolder) of the image encoder beside an IP-Adapter file, as IP-Adapter lays them out:
    'h94/IP-Adapter/models/x.safetensors' -> ('h94/IP-Adapter', 'models/image_encoder'); a local file ->
    (its folder's image_encoder/, '')."""
    path = Path(str(ip_adapter)).expanduser()
    if path.is_file() or looks_local(ip_adapter):
        return str(path.parent / "image_encoder"), ""
    repo, sub, _ = split_hub_file(ip_adapter)
    return repo, f"{sub}/image_encoder" if sub else "image_encoder"
