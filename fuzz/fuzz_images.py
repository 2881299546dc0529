"""Coverage-guided fuzzing of Fovea's image decoders (atheris, libFuzzer's engine for Python).

Arbitrary bytes go through what a worker does with one encoded image: fovea.images.decode with the
worker's real pixel limit (half the inputs at the reduced JPEG scale the worker would pick), then
preprocess for a 224x224 model. Anything but InvalidArgument (the
project's InvalidImage is one) is a finding, and so are a hang (-timeout) and memory past -rss_limit_mb.

    python fuzz/fuzz_images.py --seconds 60          # a time-boxed run; prints executions and coverage
    python fuzz/fuzz_images.py WORK_DIR fuzz/corpus/images -max_total_time=3600   # plain libFuzzer flags

Coverage is of the Python side (fovea.images and Pillow's format plugins, instrumented here); the C
libraries (libjpeg-turbo, zlib, libwebp, Pillow's own PNG, GIF and BMP decoders) run uninstrumented inside.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # fovea and worker, from this checkout

if "--seconds" not in sys.argv:  # the fuzzing process itself (the runner below starts it)
    import warnings

    import atheris
    import numpy as np
    import simplejpeg  # noqa: F401 - a C extension: nothing to instrument, imported before the block

    with atheris.instrument_imports(include=["fovea", "PIL"]):
        from PIL import BmpImagePlugin, GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

        from fovea.errors import InvalidArgument
        from fovea.images import Preprocess, decode, preprocess

    from worker.config import WorkerConfig

    MAX_PIXELS = WorkerConfig.model_fields["max_image_pixels"].default
    MARGIN = WorkerConfig.model_fields["jpeg_decode_margin"].default
    MODEL = Preprocess(resize_short=256, crop_height=224, crop_width=224, mean=(0.5,), std=(0.5,), grayscale=False)
    GRAY_MODEL = Preprocess(resize_short=32, crop_height=28, crop_width=28, mean=(0.5,), std=(0.5,), grayscale=True)


def test_one_input(data: bytes) -> None:
    grayscale = len(data) % 2 == 1  # both decoder outputs, chosen by the input itself
    model = GRAY_MODEL if grayscale else MODEL
    # Half the inputs decode as the worker does for this model (a JPEG at reduced scale), half in full.
    needs = model.needs.times(MARGIN) if len(data) % 4 >= 2 else None
    try:
        pixels = decode(data, MAX_PIXELS, grayscale=grayscale, needs=needs)
    except InvalidArgument:
        return
    check(pixels, grayscale)
    x = preprocess(pixels, model)
    assert x.shape == ((1, 28, 28) if grayscale else (3, 224, 224)), x.shape
    assert np.isfinite(x).all()


def check(pixels: np.ndarray, grayscale: bool) -> None:
    """What the worker relies on: 8-bit pixels, the right channels, within the pixel limit."""
    assert pixels.dtype == np.uint8, pixels.dtype
    assert pixels.ndim == (2 if grayscale else 3), pixels.shape
    assert grayscale or pixels.shape[2] == 3, pixels.shape
    assert 0 < pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS, pixels.shape


def run(seconds: int, extra: list[str]) -> int:
    """Fuzz for `seconds` from the checked-in seeds (new inputs go to a temporary folder) and sum up."""
    import re
    import subprocess
    import tempfile

    here = pathlib.Path(__file__).resolve().parent
    findings = here / "findings"
    findings.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-images-") as work:
        args = [sys.executable, str(here / "fuzz_images.py"), work, str(here / "corpus" / "images")]
        args += [f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-max_len=65536"]
        args += ["-print_final_stats=1", f"-artifact_prefix={findings}/", *extra]
        out = subprocess.run(args, capture_output=True, text=True, cwd=here.parent)
    log = out.stdout + out.stderr
    sys.stderr.write(log[-4000:])
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    last = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    runs, cov, ft, corpus = last[-1] if last else ("0", "0", "0", "0")
    crashed = out.returncode != 0
    print(
        f"fuzz_images: {stats.get('number_of_executed_units', runs)} executions in {seconds} s, "
        f"coverage {cov} edges, {ft} features, corpus {corpus} inputs, "
        f"peak RSS {stats.get('peak_rss_mb', '?')} MB, findings: {'YES, see ' + str(findings) if crashed else 0}"
    )
    return out.returncode


def main() -> None:
    if "--seconds" in sys.argv:
        at = sys.argv.index("--seconds")
        sys.exit(run(int(sys.argv[at + 1]), sys.argv[1:at] + sys.argv[at + 2 :]))
    warnings.simplefilter("ignore")  # Pillow's chatter about odd files is not a finding
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
