"""Decode encoded images (JPEG, PNG, WebP; GIF and BMP too) safely and turn them into model input.

The pixel limit is checked from the header, before any pixel is decoded, so a
decompression bomb costs nothing.

Odd but valid photos come out as the same upright 8-bit RGB a plain JPEG would: the EXIF
orientation is applied (JPEG, PNG, WebP), 16-bit grayscale is scaled to 8 bits, transparency
is composited over white, CMYK and YCCK JPEGs are converted (libjpeg-turbo, Adobe's inverted
convention), and animated GIF and WebP give their first frame. Plain JPEGs keep the fast path:
libjpeg-turbo through simplejpeg, plus a walk over the few marker segments before the image data.

Given the size preprocessing needs (Needs; the worker adds a margin, jpeg_decode_margin), a JPEG is
decoded at the smallest of libjpeg-turbo's DCT scales 1/2, 1/4, 1/8 that still leaves that size: a
12-megapixel photo costs a fraction of a full decode and no large resize.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fovea.errors import InvalidImage

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PILLOW_FORMATS = ("PNG", "WEBP", "JPEG", "BMP", "GIF")
ORIENTATION_TAG = 0x0112
MAX_JPEG_SEGMENTS = 64
MAX_JPEG_SCANS = 64
PROGRESSIVE_FRAMES = (0xC2, 0xC6, 0xCA, 0xCE)
"""SOF2, SOF6, SOF10, SOF14: the progressive JPEG frame types (Huffman or arithmetic, plain or differential)."""
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
MAX_ASPECT = 64
"""Images longer than this many times their width (or wider than their height) resize only the crop."""
MAX_RLE_BMP_PIXELS = 1 << 21
"""Pixel limit of a run-length-encoded BMP (compression 1 or 2). Pillow decodes those in Python, byte by byte
(about 85 ns a pixel here), so the general limit would let one small file hold a worker for seconds; real
photos are never RLE BMPs (they are palette images)."""
BACKGROUND = (255, 255, 255)
"""Transparent pixels are shown on white, as browsers and image viewers show them."""


JPEG_SCALES = (8, 4, 2)
"""Reduced-scale JPEG decodes tried, as divisors, largest first: libjpeg-turbo's DCT scaling, powers of two
only (1/8 keeps each 8x8 block's DC value; the 1/4 and 1/2 IDCTs have SIMD code; its other factors, 3/8,
5/8 and so on, run plain C)."""


@dataclass(frozen=True)
class Needs:
    """The smallest upright image preprocessing can use without enlarging it: the short side at least
    short, the height at least height and the width at least width."""

    short: int
    height: int
    width: int

    def met_by(self, width: int, height: int) -> bool:
        return min(width, height) >= self.short and height >= self.height and width >= self.width

    def times(self, margin: float) -> Needs:
        """These needs with margin: a reduced decode at least margin times the size the resize goes to, so
        that the resize's own filtering does part of the reduction."""
        return Needs(*(math.ceil(v * margin) for v in (self.short, self.height, self.width)))


@dataclass(frozen=True)
class Preprocess:
    """The fields of fovea.v1.Preprocessing, as plain values."""

    resize_short: int
    crop_height: int
    crop_width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grayscale: bool
    layout: str = "NCHW"
    """NCHW or NHWC, as the model's input takes it."""
    pixels: bool = False
    """The model takes integer pixels 0-255 (a UINT8 input): no scaling or normalisation."""

    @classmethod
    def from_proto(cls, pre: object, input_spec: object = None) -> Preprocess:
        """From fovea.v1.Preprocessing; input_spec (a TensorSpec) supplies layout and data type."""
        from fovea.v1 import model_pb2

        layout = getattr(input_spec, "layout", "") or "NCHW"
        return cls(
            layout=layout,
            pixels=getattr(input_spec, "datatype", "") == "UINT8",
            resize_short=int(pre.resize_short),  # type: ignore[attr-defined]
            crop_height=int(pre.crop_height),  # type: ignore[attr-defined]
            crop_width=int(pre.crop_width),  # type: ignore[attr-defined]
            mean=tuple(pre.mean) or (0.0,),  # type: ignore[attr-defined]
            std=tuple(pre.std) or (1.0,),  # type: ignore[attr-defined]
            grayscale=pre.color_mode == model_pb2.COLOR_MODE_GRAYSCALE,  # type: ignore[attr-defined]
        )

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def needs(self) -> Needs:
        """What preprocess() needs of a decoded image: it resizes the short side to resize_short (or the
        whole image to the crop when that is 0), then crops."""
        return Needs(self.resize_short, self.crop_height, self.crop_width)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; raises InvalidImage when it is not an image."""
    if data[:3] == JPEG_MAGIC:
        import simplejpeg

        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(w), int(h)
        except ValueError as exc:
            raise InvalidImage(f"corrupt JPEG: {exc}") from None
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:
            return im.size
    except Image.DecompressionBombError as exc:
        # Pillow refuses on its own past twice its MAX_IMAGE_PIXELS, before our limit is even asked.
        raise InvalidImage(f"image has too many pixels: {exc}") from None
    except Exception:  # noqa: BLE001 - any failure means the bytes are not an image we read
        raise InvalidImage("not an image: expected JPEG, PNG or WebP bytes") from None


def decode(data: bytes, max_pixels: int, grayscale: bool = False, needs: Needs | None = None) -> np.ndarray:
    """HxWx3 (or HxW) uint8 pixels, upright as the EXIF orientation says; refuses images over max_pixels
    (the full size, whatever the scale) before decoding them. With needs, a JPEG may come out smaller than
    stored: at 1/2, 1/4 or 1/8 scale, the smallest that still meets needs once upright."""
    if not data:
        raise InvalidImage("empty image")
    w, h = image_size(data)
    if w <= 0 or h <= 0:
        raise InvalidImage("image has no pixels")
    if w * h > max_pixels:
        raise InvalidImage(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if w * h > MAX_RLE_BMP_PIXELS and _rle_bmp(data):
        raise InvalidImage(
            f"run-length-encoded BMP is {w}x{h} = {w * h} pixels; the limit for RLE BMPs is {MAX_RLE_BMP_PIXELS} "
            "(send PNG or an uncompressed BMP)"
        )
    try:
        if data[:3] == JPEG_MAGIC:
            orientation, progressive = jpeg_header(data)
            scale = jpeg_scale(w, h, orientation, needs)
            pixels = _decode_jpeg(data, grayscale, progressive, w, h, scale)
        else:
            pixels, orientation = _decode_pillow(data, grayscale)
    except InvalidImage:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InvalidImage(f"corrupt image: {str(exc)[:200]}") from None
    return upright(pixels, orientation)


def decoded_pixels(data: bytes, needs: Needs | None = None) -> int:
    """How many pixels decode(data, ..., needs) makes, from the header alone: a JPEG at the scale it will decode
    at, anything else in full. Raises InvalidImage when it is not an image, as decode would."""
    w, h = image_size(data)
    if data[:3] == JPEG_MAGIC and needs is not None:
        scale = jpeg_scale(w, h, jpeg_header(data)[0], needs)
        return -(-w // scale) * -(-h // scale)
    return w * h


def _rle_bmp(data: bytes) -> bool:
    """Whether a BMP's info header (40 bytes or more; the 12-byte OS/2 one has no compression field) says RLE8
    (1) or RLE4 (2)."""
    if data[:2] != b"BM" or len(data) < 34:
        return False
    return int.from_bytes(data[14:18], "little") >= 40 and int.from_bytes(data[30:34], "little") in (1, 2)


def jpeg_scale(width: int, height: int, orientation: int, needs: Needs | None) -> int:
    """The largest divisor of JPEG_SCALES (1 for none) at which a stored width x height image still meets
    needs once turned upright (orientations 5-8 swap width and height)."""
    if needs is None:
        return 1
    if orientation >= 5:
        width, height = height, width
    for divisor in JPEG_SCALES:
        # libjpeg-turbo rounds scaled sizes up (TJSCALED).
        if needs.met_by(-(-width // divisor), -(-height // divisor)):
            return divisor
    return 1


def _decode_jpeg(data: bytes, grayscale: bool, progressive: bool, w: int, h: int, scale: int) -> np.ndarray:
    # libjpeg-turbo converts CMYK and YCCK (Adobe's inverted convention) to RGB or gray itself.
    import simplejpeg

    # Every scan of a progressive JPEG is a pass over the whole image, and a scan of a flat image
    # costs a few bytes: 99 scans in 78 KB take 10x a baseline decode of the same 36M pixels. FF DA
    # starts a scan and cannot occur inside entropy-coded data, so the count is near exact; it costs
    # about 3 us per KB, so only progressive files pay it (a sequential one has a scan per component).
    scans = data.count(b"\xff\xda") if progressive else 1
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(f"JPEG has {scans} scans; the limit is {MAX_JPEG_SCANS} (a progressive JPEG needs about 10)")
    # simplejpeg picks the smallest scale whose output is at least min_width x min_height: the scaled
    # size itself picks exactly 1/scale.
    sizes = {"min_width": -(-w // scale), "min_height": -(-h // scale)} if scale > 1 else {}
    if grayscale:
        return simplejpeg.decode_jpeg(data, colorspace="GRAY", **sizes)[..., 0]
    return simplejpeg.decode_jpeg(data, colorspace="RGB", **sizes)


def _decode_pillow(data: bytes, grayscale: bool) -> tuple[np.ndarray, int]:
    """Pixels of the first frame, 8 bits, transparency flattened, and the EXIF orientation."""
    with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:
        im.load()  # the first frame only, for animated GIF and WebP
        orientation = _pillow_orientation(im)
        flat = _flatten(_eight_bit(im))
        return np.asarray(flat.convert("L" if grayscale else "RGB")), orientation


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale scaled to 8 bits; Pillow's own conversion clips it at 255."""
    if im.mode not in WIDE_GRAY_MODES:
        return im
    values = np.asarray(im)
    if im.mode == "I":
        values = np.clip(values, 0, 65535)  # PNG, the only source here, never goes past 16 bits
    scaled = values.astype(np.uint32)  # in place from here: 40M pixels are 160 MB at this width
    scaled += 128
    scaled //= 257  # round(v / 257): 65535 -> 255
    gray = Image.fromarray(scaled.astype(np.uint8))
    key = im.info.get("transparency")
    if not isinstance(key, int):
        return gray
    # tRNS on 16-bit gray names one 16-bit value as transparent; compare before scaling.
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (gray, alpha))


def _flatten(im: Image.Image) -> Image.Image:
    """Images with an alpha channel or a transparent colour, composited over BACKGROUND."""
    if im.mode not in ALPHA_MODES and "transparency" not in im.info:
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)


def _pillow_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the photo unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) from a JPEG's APP1 segment, 1 when there is none."""
    return jpeg_header(data)[0]


def jpeg_header(data: bytes) -> tuple[int, bool]:
    """(EXIF orientation, whether the JPEG is progressive), from the marker segments before the frame.

    Walks a handful of segments, each skipped by its length, so the fast path stays fast. When it
    cannot find the frame header it says progressive, so that the scans are counted.
    """
    orientation, pos = None, 2
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: the frame starts
            return orientation or 1, marker in PROGRESSIVE_FRAMES
        if marker in (0xD9, 0xDA):
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if orientation is None and marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            orientation = tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + max(length, 2)
    return orientation or 1, True


def tiff_orientation(tiff: bytes) -> int:
    """The orientation tag of a TIFF header's first IFD (EXIF's layout), 1 when absent or malformed."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1

    def number(offset: int, size: int) -> int:
        return int.from_bytes(tiff[offset : offset + size], order)  # type: ignore[arg-type]

    ifd = number(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    entries = min(number(ifd, 2), (len(tiff) - ifd - 2) // 12)
    for i in range(entries):
        entry = ifd + 2 + 12 * i
        if number(entry, 2) != ORIENTATION_TAG:
            continue
        kind = number(entry + 2, 2)  # 3 = SHORT, 4 = LONG; the value sits in the entry itself
        value = number(entry + 8, 2 if kind == 3 else 4) if kind in (3, 4) else 1
        return value if 1 <= value <= 8 else 1
    return 1


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels stored with EXIF orientation 1-8 upright (as Pillow's ImageOps.exif_transpose does)."""
    if orientation == 1:
        return pixels
    turned = {
        2: lambda p: p[:, ::-1],  # mirrored left to right
        3: lambda p: p[::-1, ::-1],  # upside down
        4: lambda p: p[::-1],  # mirrored top to bottom
        5: lambda p: p.swapaxes(0, 1),  # transposed
        6: lambda p: np.rot90(p, -1),  # stored turned left: turn it right
        7: lambda p: p[::-1, ::-1].swapaxes(0, 1),  # transversed
        8: lambda p: np.rot90(p, 1),  # stored turned right: turn it left
    }[orientation](pixels)
    return np.ascontiguousarray(turned)


def preprocess(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Resize the short side, centre-crop, then either scale to [0, 1] and normalise (float32) or,
    for models that take integer pixels, keep them as uint8; CHW or HWC as the model takes it."""
    if spec.grayscale and pixels.ndim == 3:
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))
    if not spec.grayscale and pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    h, w = pixels.shape[:2]
    ch, cw = spec.crop_height, spec.crop_width
    if spec.resize_short:
        scale = spec.resize_short / min(h, w)
        nh, nw = max(ch, round(h * scale)), max(cw, round(w * scale))
    else:
        nh, nw = ch, cw
    top, left = (nh - ch) // 2, (nw - cw) // 2
    if nh * nw > MAX_ASPECT * max(ch, cw, spec.resize_short) ** 2:
        # A long thin image (1x40M pixels would be scaled to 10^10): resize only the box the crop
        # keeps. The same pixels up to rounding (one level in some), with memory bounded by the crop.
        sy, sx = h / nh, w / nw
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        pixels = np.asarray(Image.fromarray(pixels).resize((cw, ch), Image.Resampling.BILINEAR, box=box))
    else:
        if (nh, nw) != (h, w):
            pixels = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BILINEAR))
        pixels = pixels[top : top + ch, left : left + cw]
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    hwc = spec.layout == "NHWC"
    if spec.pixels:
        return np.ascontiguousarray(pixels if hwc else pixels.transpose(2, 0, 1), dtype=np.uint8)
    x = pixels.astype(np.float32)  # HWC until the end
    mean = np.asarray(spec.mean, np.float32).reshape(1, 1, -1)
    std = np.asarray(spec.std, np.float32).reshape(1, 1, -1)
    # (x/255 - mean) / std, folded into one multiply-add.
    x = x * (1.0 / (255.0 * std)) - mean / std
    return np.ascontiguousarray(x if hwc else x.transpose(2, 0, 1), dtype=np.float32)
