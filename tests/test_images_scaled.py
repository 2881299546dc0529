"""Reduced-scale JPEG decoding (libjpeg-turbo's DCT scaling) at the size preprocessing needs: the scale
picked, orientation, grayscale, progressive and CMYK files, and refusals unchanged. Top-1 and top-5
agreement with full decoding on a real ImageNet model is measured by bench/images/jpeg_scale.py."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fovea.errors import InvalidImage
from fovea.images import Needs, Preprocess, decode, jpeg_scale, preprocess

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "images"
LIMIT = 40_000_000
EFFNET = Preprocess(resize_short=256, crop_height=224, crop_width=224, mean=(0.5,), std=(0.5,), grayscale=False)


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **{"quality": 90, **options})
    return buf.getvalue()


def photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.BICUBIC)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def shrink(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A full decode brought to a reduced decode's size, to compare their content."""
    return np.asarray(Image.fromarray(pixels).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


@pytest.mark.parametrize(
    ("size", "divisor"),
    [
        ((4000, 3000), 8),  # 12 MP phone photo: 500x375
        ((1155, 866), 2),  # 1 MP: 578x433; at 1/4 the short side would be 217
        ((2048, 1536), 4),  # 512x384; at 1/8 192
        ((2048, 2048), 8),  # exactly 256 at 1/8: met, not enlarged
        ((2040, 2040), 4),  # 255 at 1/8: one pixel short
        ((640, 480), 1),  # too small for any scale
        ((300, 200), 1),
    ],
)
def test_the_smallest_scale_that_meets_the_needs(size: tuple[int, int], divisor: int) -> None:
    w, h = size
    assert jpeg_scale(w, h, 1, EFFNET.needs) == divisor
    got = decode(encode(photo(w, h)), LIMIT, needs=EFFNET.needs)
    assert got.shape == (-(-h // divisor), -(-w // divisor), 3)
    assert divisor == 1 or EFFNET.needs.met_by(got.shape[1], got.shape[0])


def test_without_needs_the_decode_is_full_size() -> None:
    assert decode(encode(photo(4000, 3000)), LIMIT).shape == (3000, 4000, 3)
    assert jpeg_scale(4000, 3000, 1, None) == 1


def test_a_reduced_decode_shows_the_same_picture() -> None:
    encoded = encode(photo(4000, 3000))
    full = decode(encoded, LIMIT)
    small = decode(encoded, LIMIT, needs=EFFNET.needs)
    assert difference(small, shrink(full, small.shape)) < 2.0
    # And the model's input: a few hundredths of the [-1, 1] range apart on average.
    assert difference(preprocess(small, EFFNET), preprocess(full, EFFNET)) < 0.03


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_turned_photos_meet_the_needs_once_upright(orientation: int) -> None:
    """Stored 1600x800 and turned, the photo is 800 wide and 1600 high. A crop 400 high and 100 wide
    needs 1/4 scale (200x400 upright); judged on the stored size it would have been 1/2."""
    tall = Preprocess(resize_short=0, crop_height=400, crop_width=100, mean=(0.5,), std=(0.5,), grayscale=False)
    assert jpeg_scale(1600, 800, 1, tall.needs) == 2
    assert jpeg_scale(1600, 800, orientation, tall.needs) == 4
    tags = Image.Exif()
    tags[0x0112] = orientation
    encoded = encode(photo(1600, 800), exif=tags)
    full = decode(encoded, LIMIT)
    small = decode(encoded, LIMIT, needs=tall.needs)
    assert full.shape == (1600, 800, 3) and small.shape == (400, 200, 3)
    assert difference(small, shrink(full, small.shape)) < 2.0
    assert preprocess(small, tall).shape == (3, 400, 100)


def test_grayscale_reduced_decode() -> None:
    gray = Preprocess(resize_short=256, crop_height=224, crop_width=224, mean=(0.5,), std=(0.5,), grayscale=True)
    encoded = encode(photo(4000, 3000))
    full = decode(encoded, LIMIT, grayscale=True)
    small = decode(encoded, LIMIT, grayscale=True, needs=gray.needs)
    assert small.shape == (375, 500) and small.dtype == np.uint8
    assert difference(small, shrink(full, small.shape)) < 2.0
    assert preprocess(small, gray).shape == (1, 224, 224)


def test_progressive_and_cmyk_jpegs_decode_reduced() -> None:
    image = photo(2048, 1536)
    for encoded in (encode(image, progressive=True), encode(image.convert("CMYK"))):
        full = decode(encoded, LIMIT)
        small = decode(encoded, LIMIT, needs=EFFNET.needs)
        assert small.shape == (384, 512, 3)
        assert difference(small, shrink(full, small.shape)) < 2.5


def test_other_formats_ignore_the_needs() -> None:
    encoded = encode(photo(1024, 768), "PNG")
    assert decode(encoded, LIMIT, needs=Needs(64, 64, 64)).shape == (768, 1024, 3)


def test_refusals_are_unchanged_at_reduced_scale() -> None:
    """The pixel limit counts the stored size, not the decoded one; scans are counted as before."""
    needs = Needs(8, 8, 8)
    encoded = encode(photo(4000, 3000))
    with pytest.raises(InvalidImage, match="4000x3000 = 12000000 pixels; the limit is 11999999"):
        decode(encoded, 11_999_999, needs=needs)
    with pytest.raises(InvalidImage, match="JPEG has 99 scans; the limit is 64"):
        decode((FIXTURES / "many-scans.jpg").read_bytes(), LIMIT, needs=needs)
    for cut in (100, len(encoded) // 2):
        with pytest.raises(InvalidImage):
            decode(encoded[:cut], LIMIT, needs=needs)
    with pytest.raises(InvalidImage, match="empty image"):
        decode(b"", LIMIT, needs=needs)


def test_a_margin_keeps_more_pixels_for_the_resize() -> None:
    """The worker's default margin of 2: a 12 MP photo decodes at 1/4 (1000x750, resized to 341x256 by
    preprocessing), and a 1 MP one in full, since half of it would be under twice the 256 pixels."""
    twice = EFFNET.needs.times(2)
    assert twice == Needs(512, 448, 448)
    assert EFFNET.needs.times(1.5) == Needs(384, 336, 336)
    assert jpeg_scale(4000, 3000, 1, twice) == 4
    assert jpeg_scale(1155, 866, 1, twice) == 1
    assert decode(encode(photo(4000, 3000)), LIMIT, needs=twice).shape == (750, 1000, 3)


def test_the_worker_setting_refuses_a_margin_that_would_enlarge() -> None:
    from pydantic import ValidationError

    from worker.config import WorkerConfig

    assert WorkerConfig().jpeg_decode_margin == 2.0
    assert WorkerConfig(jpeg_decode_margin=0).jpeg_decode_margin == 0
    with pytest.raises(ValidationError, match="at least 1"):
        WorkerConfig(jpeg_decode_margin=0.5)
