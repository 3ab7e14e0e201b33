"""A reference image from an upload: ipywidgets' FileUpload (7 and 8) or Colab's own upload dialog.

    images = parse_upload(upload.value)     # [(file name, RGB PIL image)]; ValueError naming the file

Colab's FileUpload silently loses files over about 1 MB (jupyter-widgets/ipywidgets issue 3452): such a file
arrives empty or cut short, and that is reported with the two ways around it (COLAB_UPLOAD_LIMIT).
"""

from __future__ import annotations

import io

from PIL import Image

UPLOAD_PREFIX = "upload:"

COLAB_UPLOAD_LIMIT = ("Colab's FileUpload loses files over about 1 MB (ipywidgets issue 3452): type the file's "
                      "path in the Path box (e.g. on the mounted Drive, /content/drive/MyDrive/...) or use the "
                      "'Upload (Colab)' button")

def parse_upload(value) -> list[tuple[str, Image.Image]]:
    """The images in a FileUpload's value, as (file name, RGB PIL image), for both ipywidgets versions:

    ipywidgets 7 (Colab): a dict {file name: {"metadata": {...}, "content": bytes}}
    ipywidgets 8:         a tuple of dicts {"name": ..., "type": ..., "size": ..., "content": memoryview}

    Raises ValueError naming the file when its content is empty or cut short (what Colab delivers for a file
    over about 1 MB) or is not an image PIL can read.
    """
    if not value:
        return []
    if isinstance(value, dict):  # ipywidgets 7 (or google.colab.files.upload(): {name: bytes})
        items = [(name, entry.get("content", b""), entry.get("metadata", {}).get("size")) if isinstance(entry, dict)
                 else (name, entry, None) for name, entry in value.items()]
    elif isinstance(value, (tuple, list)):  # ipywidgets 8
        items = [(entry.get("name") or entry.get("metadata", {}).get("name") or f"upload{i}", entry.get("content", b""),
                  entry.get("size", entry.get("metadata", {}).get("size"))) for i, entry in enumerate(value)]
    else:
        raise TypeError(f"unexpected FileUpload value of type {type(value).__name__}")
    out = []
    for name, content, size in items:
        data = bytes(content or b"")  # memoryview (8) or bytes (7)
        if not data or (size and len(data) < int(size)):
            got = "arrived empty" if not data else f"arrived cut short ({len(data)} of {size} bytes)"
            raise ValueError(f"the upload of {name!r} {got}. {COLAB_UPLOAD_LIMIT}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001  (PIL raises several types for unreadable data)
            raise ValueError(f"uploaded file {name!r} ({len(data)} bytes) is not an image PIL can read ({e})") from None
        out.append((name, image))
    return out
