"""helpers.data.images: an image over the pixel limit is refused from its header, before any decoding; the alpha
channel and mask files become masks."""
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers.data.images import MAX_PIXELS, SkipItem, decode_image


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height and whose pixel data is a stub: decoding it would fail (and
    would need width * height * 3 bytes), so only a refusal made from the header gives 'too large'."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7_000, 10_000])  # 49 Mpx: under the limit; 100 Mpx: between PIL's warning and error
def test_an_image_over_the_limit_is_refused_from_its_header(side):
    data = png_header(side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not be the only word
        with pytest.raises(SkipItem) as err:
            decode_image(data)
    if side * side > MAX_PIXELS:
        assert err.value.reason.startswith("too large: 10000x10000 px (100 Mpx), over the limit of 50 Mpx")
    else:
        assert err.value.reason.startswith("truncated or corrupt")  # decoded, and the stub failed


def test_the_limit_is_a_setting():
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 10, 10)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), max_pixels=48 * 40).size == (48, 40)
    with pytest.raises(SkipItem, match=r"too large: 48x40 px \(0.00192 Mpx\), over the limit of 0.001919 Mpx \(max_pixels"):
        decode_image(buf.getvalue(), max_pixels=48 * 40 - 1)


def test_prepare_dataset_reports_the_refused_image(tmp_path):
    from helpers.data.prepare import prepare_dataset
    from helpers.tiny.cartoons import draw_character

    (tmp_path / "pics").mkdir()
    draw_character(0, "standing", 0, size=48).save(tmp_path / "pics" / "small.png")
    draw_character(1, "waving", 1, size=32).save(tmp_path / "pics" / "smaller.png")
    (tmp_path / "pics" / "huge.png").write_bytes(png_header(10_000, 10_000))
    prep = prepare_dataset(tmp_path / "pics", tmp_path / "out", resolution=32, test_fraction=0, progress=False)
    assert sorted(prep.train["id"]) == ["small.png", "smaller.png"]
    assert prep.skipped[0][0] == "huge.png" and prep.skipped[0][1].startswith("too large: 10000x10000 px")
    again = prepare_dataset(tmp_path / "pics", tmp_path / "out2", resolution=32, test_fraction=0, max_pixels=40 * 40,
                            progress=False)
    assert list(again.train["id"]) == ["smaller.png"]
    assert dict(again.skipped)["small.png"].startswith("too large: 48x48 px")


def test_the_alpha_channel_is_the_users_mask_read_before_compositing():
    """Any transparent mode gives its alpha as a mask (>= 128: the character) and its picture on white; an
    opaque image, or an alpha channel that hides nothing, gives none."""
    from helpers.data.images import decode_image_and_alpha

    def encoded(im, **kw):
        buf = io.BytesIO()
        im.save(buf, "PNG", **kw)
        return buf.getvalue()

    half = np.zeros((8, 8), bool)
    half[:, :4] = True  # the left half is the character
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 4, 8))
    la = Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.where(half, 200, 100).astype(np.uint8)]), "LA")
    palette = Image.fromarray(np.where(half, 1, 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    for data, hidden in ((encoded(rgba), 255), (encoded(palette, transparency=0), 255), (encoded(la), 175)):
        image, alpha = decode_image_and_alpha(data)
        assert image.mode == "RGB" and alpha.mode == "L" and np.array_equal(np.asarray(alpha) > 0, half)
        assert (np.asarray(image)[~half] == hidden).all()  # composited on white (LA: 50 at alpha 100 -> 175)
    opaque = rgba.copy()
    opaque.putalpha(255)
    for data in (encoded(opaque), encoded(rgba.convert("RGB"))):
        assert decode_image_and_alpha(data)[1] is None


def test_a_mask_file_is_white_on_black_or_a_cutout_of_its_images_size():
    from helpers.data.images import decode_mask

    grey = np.zeros((6, 8), np.uint8)
    grey[2:, 3:] = 180  # >= 128: the character
    cutout = Image.new("RGBA", (8, 6), (255, 255, 255, 0))
    cutout.paste((0, 0, 0, 255), (3, 2, 8, 6))  # a black character, opaque: the alpha is read, not the colour
    for im in (Image.fromarray(grey), Image.fromarray(grey).convert("RGB"), cutout):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        mask = decode_mask(buf.getvalue(), (8, 6))
        assert mask.mode == "L" and np.array_equal(np.asarray(mask) == 255, grey > 0)
    with pytest.raises(SkipItem, match=r"bad mask: m.png is 8x6 px, its image 6x8"):
        decode_mask(buf.getvalue(), (6, 8), name="m.png")
