"""Write the seed corpus fuzz/corpus/images: tiny valid images of every format and odd case the decoder reads.

    python fuzz/make_corpus.py     # Pillow for most; ImageMagick's `convert` for YCCK, 16-bit RGB and
                                   # interlaced PNG, if present

Each seed is a 24x16 crop of scikit-image's coffee photo, so a few hundred bytes.
"""

from __future__ import annotations

import io
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
from PIL import Image
from skimage import data

OUT = pathlib.Path(__file__).resolve().parent / "corpus" / "images"


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def pillow_seeds(rgb: Image.Image) -> dict[str, bytes]:
    gray = rgb.convert("L")
    palette = rgb.quantize(16)
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    wide = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    return {
        "baseline.jpg": save(rgb, "JPEG", quality=80),
        "progressive.jpg": save(rgb, "JPEG", quality=80, progressive=True),
        "gray.jpg": save(gray, "JPEG"),
        "cmyk.jpg": save(rgb.convert("CMYK"), "JPEG"),
        "exif6.jpg": save(rgb.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif(6)),
        "exif3.png": save(rgb.transpose(Image.Transpose.ROTATE_180), "PNG", exif=exif(3)),
        "exif8.webp": save(rgb.transpose(Image.Transpose.ROTATE_270), "WEBP", exif=exif(8)),
        "rgb.png": save(rgb, "PNG"),
        "gray16.png": save(wide, "PNG"),
        "gray16-trns.png": save(wide, "PNG", transparency=257 * 100),
        "palette-trns.png": save(palette, "PNG", transparency=bytes(range(0, 256, 16))),
        "rgb-trns.png": save(rgb, "PNG", transparency=(21, 13, 8)),
        "rgba.png": save(rgba, "PNG"),
        "la.png": save(rgba.convert("LA"), "PNG"),
        "bilevel.png": save(rgb.convert("1"), "PNG"),
        "lossy.webp": save(rgb, "WEBP", quality=50),
        "lossless.webp": save(rgba, "WEBP", lossless=True),
        "animated.webp": save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
        "animated.png": save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        "animated.gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "transparent.gif": save(palette, "GIF", transparency=0),
        "rgb.bmp": save(rgb, "BMP"),
        "palette.bmp": save(palette, "BMP"),
    }


def imagemagick_seeds(rgb: Image.Image) -> dict[str, bytes]:
    convert = shutil.which("convert", path="/usr/bin:/usr/local/bin")
    if convert is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "in.png"
        rgb.save(src)
        commands = {
            "ycck.jpg": ["-colorspace", "CMYK", "jpg:{out}"],
            # no date chunks, so running this again writes the same bytes
            "rgb16.png": ["-depth", "16", "-define", "png:exclude-chunks=date,time", "PNG48:{out}"],
            "interlaced.png": ["-interlace", "PNG", "-define", "png:exclude-chunks=date,time", "png:{out}"],
        }
        seeds = {}
        for name, args in commands.items():
            out = pathlib.Path(tmp) / name
            done = subprocess.run([convert, str(src), *[a.format(out=out) for a in args]], capture_output=True)
            if done.returncode == 0 and out.exists():
                seeds[name] = out.read_bytes()
        return seeds


def main() -> None:
    rgb = Image.fromarray(data.coffee()[200:216, 300:324])
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = {**pillow_seeds(rgb), **imagemagick_seeds(rgb)}
    for name, encoded in seeds.items():
        (OUT / name).write_bytes(encoded)
    print(f"{len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes, in {OUT}")


if __name__ == "__main__":
    main()
