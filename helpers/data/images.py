"""One image file: decode and check it, convert any mode to RGB, crop it square, encode it as PNG.

    im = decode_image(data, min_side=256)    # bytes -> PIL RGB, EXIF orientation applied; raises SkipItem(reason)
                                             # (over max_pixels, default MAX_PIXELS: refused from the header)
    im = center_square(im, 512)              # centre crop + Lanczos resize
    data = png_bytes(im)                     # PIL -> PNG bytes (prepared datasets, ipywidgets.Image)

Unusual but valid images are converted, not dropped: transparency composited on white, greyscale, CMYK,
16-bit and float modes scaled to 8 bits. Broken ones raise `SkipItem` with a reason that says which kind.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # larger images are refused from their header, before decoding (prepare_dataset's max_pixels)
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # + RIFF....WEBP


class SkipItem(Exception):
    """One input that is not kept; `reason` says why. It starts with its kind, so a report can be grouped:
    empty file, not an image, truncated or corrupt, too small, too large, missing file, outside the dataset,
    bad metadata, unreadable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, *, min_side: float = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes of an image file -> a PIL RGB image, EXIF orientation applied. Raises SkipItem(reason).

    An image of more than `max_pixels` pixels is refused as "too large" from its header (PIL's Image.open
    reads the size, not the pixels), so a decompression bomb is never decoded. This limit replaces PIL's own
    warning (about 89 Mpx), which would otherwise be the only word about an image under PIL's error (about
    179 Mpx); PIL's error still holds above that.

    Transparent images (RGBA, LA, palette or RGB/L with a transparent colour) are composited on white;
    16-bit greyscale (I;16, or I with values above 255) is scaled to 8 bits rather than clipped; CMYK,
    greyscale, bilevel and other modes go through PIL's conversion. `min_side`: shorter side below it ->
    "too small".
    """
    if not data:
        raise SkipItem("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # the size is checked here, against max_pixels, right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise SkipItem("truncated or corrupt: starts like an image file but cannot be opened") from None
        raise SkipItem("not an image: no image format recognised") from None
    except Image.DecompressionBombError as e:
        raise SkipItem(f"too large: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise SkipItem(f"too large: {w}x{h} px ({w * h / 1e6:g} Mpx), over the limit of {max_pixels / 1e6:g} Mpx "
                       "(max_pixels); not decoded. Scale it down, or raise prepare_dataset's max_pixels if you trust the file.")
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise SkipItem(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipItem(f"truncated or corrupt: {im.format} data does not decode ({e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001  (a corrupt EXIF block: keep the pixels as stored)
        pass
    w, h = im.size
    if min(w, h) < min_side:
        raise SkipItem(f"too small: {w}x{h} px, shorter side under {min_side:g} px")
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB (alpha composited on white; 16-bit and float greyscale scaled to 8 bits)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":  # I;16*, I (32-bit int), F (float)
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "I":
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0  # 16-bit PNGs open as "I" in older Pillow
        else:
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def center_square(im: Image.Image, resolution: int) -> Image.Image:
    """Centre crop to a square and resize to resolution x resolution (Lanczos)."""
    if im.size == (resolution, resolution):
        return im
    return ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def png_bytes(image: Image.Image) -> bytes:
    """PNG-encoded bytes of an image (a prepared dataset's image column, an ipywidgets.Image)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
