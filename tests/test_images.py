"""The image decoder on odd but valid photos, each made by a real encoder, against the plain RGB photo.

Pillow writes most cases here at test time; ImageMagick made the two it cannot (tests/fixtures/images).
The served-model check of the same files is tests/worker/test_odd_photos.py.
"""

from __future__ import annotations

import io
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

from fovea.errors import InvalidImage
from fovea.images import Preprocess, decode, image_size, jpeg_orientation, preprocess, tiff_orientation

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "images"
LIMIT = 40_000_000  # the worker's default max_image_pixels


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 8-bit levels; the shapes must match."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def gray(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).convert("L"))


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return data.coffee()


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()


def small_coffee(size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(data.coffee()).resize(size, Image.Resampling.LANCZOS))


def test_plain_rgb_jpeg_decodes_to_the_photo(coffee: np.ndarray) -> None:
    got = decode(encode(Image.fromarray(coffee), "JPEG", quality=95), LIMIT)
    assert got.dtype == np.uint8 and difference(got, coffee) < 2.5


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(coffee: np.ndarray) -> None:
    levels = gray(coffee).astype(np.uint16) * 257  # 8-bit level v is 16-bit v * 257 exactly
    data16 = encode(Image.fromarray(levels), "PNG")
    with Image.open(io.BytesIO(data16)) as im:
        assert im.mode == "I;16"  # a real 16-bit PNG, as Pillow writes it
    assert np.array_equal(decode(data16, LIMIT, grayscale=True), gray(coffee))
    rgb = decode(data16, LIMIT)
    assert rgb.shape == coffee.shape and np.array_equal(rgb[..., 1], gray(coffee))


def test_sixteen_bit_values_round_to_the_nearest_level() -> None:
    levels = np.array([[0, 128, 129, 385, 65535, 65407]], np.uint16)
    got = decode(encode(Image.fromarray(levels), "PNG"), LIMIT, grayscale=True)
    assert got.tolist() == [[0, 0, 1, 1, 255, 255]]


def test_sixteen_bit_grayscale_transparent_value_is_white(coffee: np.ndarray) -> None:
    levels = gray(coffee).astype(np.uint16) * 257
    levels[:40] = 1234  # the tRNS value: the top band is transparent
    got = decode(encode(Image.fromarray(levels), "PNG", transparency=1234), LIMIT, grayscale=True)
    assert (got[:40] == 255).all() and np.array_equal(got[40:], gray(coffee)[40:])


def test_sixteen_bit_rgb_png_from_imagemagick() -> None:
    path = FIXTURES / "coffee-rgb16.png"
    assert path.read_bytes()[24] == 16  # IHDR bit depth
    got = decode(path.read_bytes(), LIMIT)
    assert difference(got, small_coffee((200, 133))) < 1.5


@pytest.mark.parametrize("name", ["coffee-ycck.jpg", "cmyk"])
def test_cmyk_and_ycck_jpegs_convert_with_adobe_inverted_convention(name: str) -> None:
    if name == "cmyk":  # Pillow writes plain CMYK (Adobe transform 0), inverted as Adobe does
        encoded = encode(Image.fromarray(small_coffee((200, 133))).convert("CMYK"), "JPEG", quality=95)
    else:  # ImageMagick writes YCCK (Adobe transform 2)
        encoded = (FIXTURES / name).read_bytes()
    assert b"Adobe" in encoded[:200]
    reference = small_coffee((200, 133))
    assert difference(decode(encoded, LIMIT), reference) < 4
    assert difference(decode(encoded, LIMIT, grayscale=True), gray(reference)) < 4


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def stored(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for an upright scene when it marks the given orientation."""
    upright_to_stored = {
        1: lambda p: p,
        2: lambda p: p[:, ::-1],
        3: lambda p: p[::-1, ::-1],
        4: lambda p: p[::-1],
        5: lambda p: p.swapaxes(0, 1),
        6: lambda p: np.rot90(p, 1),  # a phone held upright stores the scene turned left, tag 6
        7: lambda p: p[::-1, ::-1].swapaxes(0, 1),
        8: lambda p: np.rot90(p, -1),
    }
    return np.ascontiguousarray(upright_to_stored[orientation](pixels))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_photo_upright(chelsea: np.ndarray, orientation: int, fmt: str) -> None:
    options = {"quality": 95} if fmt != "PNG" else {}
    encoded = encode(Image.fromarray(stored(chelsea, orientation)), fmt, exif=exif(orientation), **options)
    got = decode(encoded, LIMIT)
    assert difference(got, chelsea) < 3
    # The same as Pillow's own reading of the tag.
    with Image.open(io.BytesIO(encoded)) as im:
        assert difference(got, np.asarray(ImageOps.exif_transpose(im).convert("RGB"))) < 1
    assert difference(decode(encoded, LIMIT, grayscale=True), gray(chelsea)) < 3


def test_jpeg_orientation_found_after_other_segments() -> None:
    """Phones put JFIF, XMP (also APP1) or ICC segments before the EXIF one; an II (Intel) TIFF header too."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 8) + b"\0" * 4
    app1 = b"Exif\0\0" + tiff
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"
    jfif = b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    head = b"\xff\xd8" + segment(0xE0, jfif) + segment(0xE1, xmp) + segment(0xE1, app1)
    assert jpeg_orientation(head + b"\xff\xda") == 8
    assert tiff_orientation(tiff) == 8
    # Past the start of the frame EXIF is not looked for.
    assert jpeg_orientation(b"\xff\xd8" + segment(0xC0, b"\0" * 15) + segment(0xE1, app1)) == 1


@pytest.mark.parametrize(
    "tiff",
    [b"", b"II*\x00", b"MM\x00*\xff\xff\xff\xff", b"II*\x00\x08\x00\x00\x00\xff\xff", b"XX*\x00\x08\x00\x00\x00"],
)
def test_broken_exif_means_upright_not_an_error(tiff: bytes) -> None:
    assert tiff_orientation(tiff) == 1


def test_broken_exif_in_a_valid_jpeg_still_decodes(coffee: np.ndarray) -> None:
    encoded = encode(Image.fromarray(coffee), "JPEG", quality=95, exif=b"Exif\0\0MM\0*\xff\xff\xff\xff")
    assert difference(decode(encoded, LIMIT), coffee) < 2.5


def test_palette_png_with_transparency_is_composited_over_white(coffee: np.ndarray) -> None:
    photo = coffee.copy()
    photo[:, :60] = 0  # a black band, the only pure black in the palette
    palette = Image.fromarray(photo).quantize(64)
    colours = palette.getpalette() or []
    black = min(range(64), key=lambda i: sum(colours[3 * i : 3 * i + 3]))
    alpha = bytes(0 if i == black else 255 for i in range(64))
    encoded = encode(palette, "PNG", transparency=alpha)
    with Image.open(io.BytesIO(encoded)) as im:
        assert im.mode == "P" and "transparency" in im.info
    got = decode(encoded, LIMIT)
    assert (got[:, :60] == 255).all()  # shown on white, not as the palette's black
    assert difference(got[:, 60:], coffee[:, 60:]) < 6


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_channel_is_composited_over_white(coffee: np.ndarray, mode: str) -> None:
    alpha = np.full(coffee.shape[:2], 255, np.uint8)
    alpha[:, :60] = 0
    alpha[:, 60:120] = 128
    image = Image.fromarray(coffee).convert(mode[:-1])
    image.putalpha(Image.fromarray(alpha))
    got = decode(encode(image, "PNG"), LIMIT).astype(np.int32)
    plain = np.asarray(image.convert("RGB")).astype(np.int32)
    assert (got[:, :60] == 255).all()
    assert np.abs(got[:, 60:120] - (plain[:, 60:120] + 255) / 2).max() <= 1
    assert np.array_equal(got[:, 120:], plain[:, 120:])


def test_rgb_png_with_a_transparent_colour_is_white_there(coffee: np.ndarray) -> None:
    photo = coffee.copy()
    photo[:30] = (1, 2, 3)
    got = decode(encode(Image.fromarray(photo), "PNG", transparency=(1, 2, 3)), LIMIT)
    assert (got[:30] == 255).all() and np.array_equal(got[30:], coffee[30:])


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])  # PNG: APNG
def test_animation_gives_its_first_frame(coffee: np.ndarray, chelsea: np.ndarray, fmt: str) -> None:
    frames = [Image.fromarray(coffee), Image.fromarray(chelsea).resize((600, 400)), Image.new("RGB", (600, 400))]
    options = {"quality": 95} if fmt == "WEBP" else {}
    encoded = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    with Image.open(io.BytesIO(encoded)) as im:
        assert getattr(im, "n_frames", 1) == 3
    got = decode(encoded, LIMIT)
    assert difference(got, coffee) < 4  # GIF: 256 colours
    assert difference(got, np.asarray(frames[1])) > 30


def test_animated_gif_with_a_transparent_first_frame(coffee: np.ndarray) -> None:
    quantized = Image.fromarray(coffee).quantize(255)  # indices 0-254; 255 is free to be transparent
    pixels = np.asarray(quantized).copy()
    pixels[:50] = 255
    first = Image.fromarray(pixels)
    first.putpalette((quantized.getpalette() or [])[: 255 * 3] + [0, 0, 0])  # L -> P; index 255 is black
    encoded = encode(first, "GIF", save_all=True, append_images=[Image.new("RGB", first.size)], transparency=255)
    got = decode(encoded, LIMIT)
    assert (got[:50] == 255).all() and difference(got[50:], coffee[50:]) < 6


# Hostile or broken input: always InvalidImage, with a message that says why.


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height and carries one empty row: the shape of a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (b"", "empty image"),
        (b"not an image at all", "not an image"),
        (png_header_only(100_000, 100_000), "too many pixels"),  # Pillow's own bomb check
        (png_header_only(10_000, 5_000), "the limit is 40000000"),
        (png_header_only(1000, 1000), "corrupt image"),  # no pixel data at all
        (encode(Image.new("RGB", (64, 64)), "TIFF"), "not an image"),  # formats not served
    ],
)
def test_hostile_input_is_invalid_image(encoded: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode(encoded, LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_files_are_invalid_image(coffee: np.ndarray, fmt: str) -> None:
    encoded = encode(Image.fromarray(coffee), fmt)
    for cut in (100, len(encoded) // 2, len(encoded) * 9 // 10):
        with pytest.raises(InvalidImage):
            decode(encoded[:cut], LIMIT)


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    """Each progressive scan is a pass over the whole image: a CPU bomb in a small file (fixture: cjpeg -scans)."""
    encoded = (FIXTURES / "many-scans.jpg").read_bytes()
    with pytest.raises(InvalidImage, match="JPEG has 99 scans; the limit is 64"):
        decode(encoded, LIMIT)
    progressive = encode(Image.fromarray(data.coffee()), "JPEG", quality=95, progressive=True)
    assert difference(decode(progressive, LIMIT), data.coffee()) < 4  # an ordinary progressive JPEG still decodes


def test_pixel_limit_applies_to_jpeg_headers() -> None:
    encoded = encode(Image.new("RGB", (300, 200)), "JPEG")
    assert image_size(encoded) == (300, 200)
    with pytest.raises(InvalidImage, match="300x200 = 60000 pixels; the limit is 59999"):
        decode(encoded, 59_999)


def test_a_long_thin_image_is_preprocessed_in_bounded_memory() -> None:
    """2x200,000 pixels is within the pixel limit; scaled so its short side is 256 it would be
    51M x 256 pixels (39 GB), so only the crop may be resized. Run under a 1.5 GiB address-space cap."""
    script = """
import resource, numpy as np
from fovea.images import Preprocess, decode, preprocess
from PIL import Image
import io
buf = io.BytesIO(); Image.new("RGB", (200_000, 2), (200, 100, 50)).save(buf, "PNG")
pixels = decode(buf.getvalue(), 40_000_000)
resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))
spec = Preprocess(resize_short=256, crop_height=224, crop_width=224, mean=(0.5,), std=(0.5,), grayscale=False)
x = preprocess(pixels, spec)
assert x.shape == (3, 224, 224), x.shape
print(round(float(x[0].mean()), 3))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(round(200 / 255 / 0.5 - 1, 3))


def test_preprocess_of_ordinary_images_is_unchanged_by_the_thin_image_path(coffee: np.ndarray) -> None:
    """Up to 64:1 the whole image is resized then cropped, as training's preprocessing does."""
    spec = Preprocess(resize_short=256, crop_height=224, crop_width=224, mean=(0.0,), std=(1.0,), grayscale=False)
    for pixels in (coffee, coffee[:6], coffee[:, :7]):  # 600:6 = 100:1 and 400:7 = 57:1
        h, w = pixels.shape[:2]
        scale = 256 / min(h, w)
        nh, nw = max(224, round(h * scale)), max(224, round(w * scale))
        resized = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = (nh - 224) // 2, (nw - 224) // 2
        expected = resized[top : top + 224, left : left + 224].transpose(2, 0, 1) / np.float32(255)
        levels = np.abs(preprocess(pixels, spec) - expected).max() * 255
        assert levels < 1e-3 if max(h, w) / min(h, w) <= 64 else levels <= 1.001


def _rle8_bmp(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit palette BMP compressed with RLE8 (compression 1), gray palette; rows are RLE data, bottom first."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    body = b"".join(rows) + b"\x00\x01"  # end of bitmap
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def test_small_rle_bmp_decodes() -> None:
    # two rows of 4: bottom row 4 x level 10, top row 2 x 200 then 2 x 50
    bmp = _rle8_bmp(4, 2, [b"\x04\x0a\x00\x00", b"\x02\xc8\x02\x32\x00\x00"])
    pixels = decode(bmp, 40_000_000)
    assert pixels.shape == (2, 4, 3)
    assert pixels[0, :, 0].tolist() == [200, 200, 50, 50]
    assert pixels[1, :, 0].tolist() == [10, 10, 10, 10]


def test_large_rle_bmp_is_refused_before_pillow_decodes_it_in_python() -> None:
    # Found by fuzz/fuzz_images.py in CI: 556 bytes, 1572864x16 pixels, each end-of-line marker padding a row
    # one byte at a time in Pillow's Python RLE decoder: seconds of a worker's CPU for one call.
    wide = 1572864
    bmp = _rle8_bmp(wide, 16, [b"\x00\x00"] * 16)
    with pytest.raises(InvalidImage, match="run-length-encoded BMP is 1572864x16"):
        decode(bmp, 40_000_000)
    # an uncompressed BMP of the same size is not an RLE one: the general limit governs it
    assert image_size(bmp) == (wide, 16)
