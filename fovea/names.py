"""Validated names, and the one function that builds every Redis key.

Patterns use fullmatch: with match(), "$" also matches before a trailing newline.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from fovea.errors import InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
KEY_ID_RE = re.compile(r"^[a-z0-9]{8,32}$")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PREFIX = "fovea"


def check_name(value: str, what: str = "model name") -> str:
    """Model and alias names: lowercase letters, digits, '.', '_', '-', at most 63 characters."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        shown = ascii(value[:80]) if isinstance(value, str) else type(value).__name__
        raise InvalidArgument(
            f"invalid {what} {shown}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..'"
        )
    return value


def check_sha256(value: str) -> str:
    if not SHA256_RE.fullmatch(value):
        raise InvalidArgument("invalid SHA-256 digest: expected 64 lowercase hex characters")
    return value


def check_worker_id(value: str) -> str:
    if not WORKER_ID_RE.fullmatch(value):
        raise InvalidArgument(f"invalid worker id {value[:80]!r}")
    return value


def check_key_id(value: str) -> str:
    if not KEY_ID_RE.fullmatch(value):
        raise InvalidArgument("invalid key id")
    return value


def redis_key(*parts: str | int) -> str:
    """Build a Redis key such as fovea:model:NAME:versions from validated parts.

    Callers pass names through check_name() first; this refuses separators anyway
    so that no part can forge another key.
    """
    out = [PREFIX]
    for part in parts:
        text = str(part)
        if not text or ":" in text or "\x00" in text or "\n" in text or "/" in text or "*" in text:
            raise InvalidArgument(f"invalid Redis key part {text[:80]!r}")
        out.append(text)
    return ":".join(out)


def model_allowed(patterns: Sequence[str], model: str) -> bool:
    """Whether an API key with these model patterns (shell-style, case-sensitive; none: every model) may use
    the model: the registry's copy (it has no native part). The gateway asks its front's (gateway/native/keys.h,
    C's fnmatch(3)), which agrees on the patterns key creation accepts (tests/gateway/test_native_binding.py)."""
    return not patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)
