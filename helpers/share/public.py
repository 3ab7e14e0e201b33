"""What leaves the machine: an upload folder names models and data by their Hub ids, never by a local path.

A run records where its models and data came from as the user gave them: Hub ids, or folders on their own
machine (a Colab user's Drive, a laptop's home folder). Those paths say nothing to a reader of the Hub and
tell strangers the user's folder names, so everything written to an upload folder goes through here:

    public_name("/content/drive/MyDrive/sd15")      -> "local folder"   (a Hub id stays as it is)
    public_settings(config)                          the recipe, without output_dir / data_dir, sources neutral
    tensors, metadata = public_adapter(run_adapter)  the same tensors; metadata made public (hub.py writes them)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..support.locations import looks_local, split_hub_name

LOCAL_KEYS = ("output_dir", "data_dir")  # where the run wrote and read: of no use to anyone else
SOURCE_KEYS = ("base_model", "ip_adapter", "image_encoder", "data_source", "dataset", "eval_clip", "dino")


def is_local_path(text: str) -> bool:
    """True for a string that names a place on this machine: absolute, relative ('./'), home ('~'), or an
    existing path with a separator in it."""
    text = str(text)
    return bool(text) and (Path(text).is_absolute() or looks_local(text) and ("/" in text or "\\" in text)
                           or ("/" in text and Path(text).expanduser().exists()))


def public_name(name) -> str | None:
    """A model's or dataset's name as a reader may see it: a Hub name as it is, a local path as "local folder"
    or "local file" (by whether it has a file extension), None as None."""
    if name is None:
        return None
    text = str(name)
    if not is_local_path(text) and split_hub_name(text) is not None:
        return text
    if is_local_path(text) or looks_local(text):
        return "local file" if Path(text).suffix else "local folder"
    return text


def public_settings(settings: dict) -> dict:
    """A run's settings (config.json, or an adapter's training_config) without LOCAL_KEYS, with SOURCE_KEYS
    through public_name, and any other string that names a local path replaced by "local path"."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return "local path" if isinstance(value, (str, Path)) and is_local_path(value) else value

    return {k: public_name(v) if k in SOURCE_KEYS and (v is None or isinstance(v, str)) else clean(v)
            for k, v in settings.items() if k not in LOCAL_KEYS}


def public_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """An adapter file's string metadata made public: JSON values (the training config) through
    public_settings, source names through public_name, other strings that name a local path replaced."""
    out = {}
    for key, value in metadata.items():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, dict):
            out[key] = json.dumps(public_settings(parsed))
        elif key in SOURCE_KEYS:
            out[key] = public_name(value) or ""
        else:
            out[key] = "local path" if is_local_path(value) else value
    return out


def public_adapter(adapter: Path) -> tuple[dict, dict[str, str]]:
    """`adapter`'s tensors, unchanged, and its metadata made public (public_metadata)."""
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt", device="cpu") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    return tensors, public_metadata(metadata)

