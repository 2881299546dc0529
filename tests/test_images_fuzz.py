"""The atheris target fuzz/fuzz_images.py, run by hand over its seed corpus and cut-down seeds (no fuzzing
here: that is `python fuzz/fuzz_images.py --seconds N`). Keeps the target and its seeds working."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

import pytest

from fovea.images import decode

FUZZ = pathlib.Path(__file__).resolve().parents[1] / "fuzz"
SEEDS = sorted((FUZZ / "corpus" / "images").iterdir())


@pytest.fixture(scope="module")
def target() -> ModuleType:
    pytest.importorskip("atheris")
    spec = importlib.util.spec_from_file_location("fuzz_images", FUZZ / "fuzz_images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_corpus_covers_every_format_and_decodes() -> None:
    kinds = {path.suffix for path in SEEDS}
    assert kinds == {".jpg", ".png", ".webp", ".gif", ".bmp"} and len(SEEDS) >= 20
    for path in SEEDS:
        assert decode(path.read_bytes(), 40_000_000).ndim == 3, path.name


@pytest.mark.parametrize("seed", SEEDS, ids=[path.name for path in SEEDS])
def test_target_accepts_seeds_and_their_truncations(target: ModuleType, seed: pathlib.Path) -> None:
    data = seed.read_bytes()
    for cut in (len(data), len(data) - 1, len(data) // 2, 40, 8, 0):
        target.test_one_input(data[:cut])  # raises on anything but InvalidArgument
