"""One image file: decode and check it, convert any mode to RGB, crop it square, encode it as PNG.

    im = decode_image(data, min_side=256)    # bytes -> PIL RGB, EXIF orientation applied; raises SkipItem(reason)
                                             # (over max_pixels, default MAX_PIXELS: refused from the header)
    im, alpha = decode_image_and_alpha(data) # the same, and the alpha channel as a mask (None: no transparency)
    im = center_square(im, 512)              # centre crop + Lanczos resize
    mask = decode_mask(data, im.size)        # a mask file -> "L", 255 on the character (alpha, else white)
    mask = center_square_mask(mask, 512)     # the same crop and resize for a mask ("L", 0 or 255)
    data = png_bytes(im)                     # PIL -> PNG bytes (prepared datasets, ipywidgets.Image)

Unusual but valid images are converted, not dropped: transparency composited on white, greyscale, CMYK,
16-bit and float modes scaled to 8 bits. Broken ones raise `SkipItem` with a reason that says which kind.
A transparent image's alpha channel is read before it is composited (`alpha_mask`): it is the user's own
mask of the character (helpers.data.masks), alpha >= 128 the character.
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


def _decode(data: bytes, *, min_side: float = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The checks of decode_image, and the decoded image in its own mode (EXIF orientation applied)."""
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
    return im


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
    return to_rgb(_decode(data, min_side=min_side, max_pixels=max_pixels))


def decode_image_and_alpha(data: bytes, *, min_side: float = 0, max_pixels: int = MAX_PIXELS):
    """(PIL RGB as decode_image gives it, its alpha channel as a mask or None): alpha_mask read from the
    decoded image BEFORE to_rgb composites it on white. Raises SkipItem(reason) as decode_image does."""
    im = _decode(data, min_side=min_side, max_pixels=max_pixels)
    return to_rgb(im), alpha_mask(im)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("RGB", "L", "P") and "transparency" in im.info)


def alpha_mask(im: Image.Image) -> Image.Image | None:
    """The alpha channel of a transparent image as a mask: PIL "L", 255 where alpha >= 128 (the character), 0
    elsewhere. None when the image has no transparency, or an alpha channel that hides nothing (all >= 128)."""
    if not _has_alpha(im):
        return None
    alpha = np.asarray(im.convert("RGBA").getchannel("A")) >= 128
    return None if alpha.all() else Image.fromarray(np.where(alpha, 255, 0).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB (alpha composited on white; 16-bit and float greyscale scaled to 8 bits)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if _has_alpha(im):
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


def decode_mask(data: bytes, size: tuple[int, int], *, name: str = "the mask") -> Image.Image:
    """A mask file's bytes -> PIL "L", 255 on the character: its alpha channel (alpha_mask) when it has
    transparency, else its grey level >= 128 (white: the character). Raises SkipItem("bad mask: ...") when it
    cannot be decoded or is not `size` (its image's size, EXIF orientation applied to both)."""
    try:
        im = _decode(data)
    except SkipItem as e:
        raise SkipItem(f"bad mask: {name}: {e.reason}") from None
    if im.size != tuple(size):
        raise SkipItem(f"bad mask: {name} is {im.size[0]}x{im.size[1]} px, its image {size[0]}x{size[1]}: a mask must "
                       "have its image's size (draw it on the image, or export it at the image's size)")
    alpha = alpha_mask(im)
    if alpha is not None or _has_alpha(im):  # a cutout: its alpha (all opaque: all character)
        return alpha if alpha is not None else Image.new("L", im.size, 255)
    grey = np.asarray(to_rgb(im).convert("L")) >= 128
    return Image.fromarray(np.where(grey, 255, 0).astype(np.uint8), "L")


def center_square_mask(mask: Image.Image, resolution: int) -> Image.Image:
    """A mask ("L", or anything convertible) cropped and resized as center_square crops and resizes its image,
    then made binary again: "L", 255 where the resized value is >= 128. A mask already resolution x resolution
    is only made binary (so a mask at the training size arrives unchanged)."""
    mask = center_square(mask.convert("L"), resolution)
    return Image.fromarray(np.where(np.asarray(mask) >= 128, 255, 0).astype(np.uint8), "L")


def png_bytes(image: Image.Image) -> bytes:
    """PNG-encoded bytes of an image (a prepared dataset's image column, an ipywidgets.Image)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
