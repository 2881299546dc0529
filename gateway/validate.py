"""The version a ModelReady, ModelMetadata or ModelStatistics call asks for.

A ModelInferRequest's rules (and this one, for its model_version) live in the native front only
(gateway/native/front.cc, namespace check; Python asks through fg_check_infer), which words them the same way.
"""

from __future__ import annotations

from fovea.errors import InvalidArgument


def check_version(version: str) -> int:
    """The version asked for, 0 for none."""
    if not version:
        return 0
    if len(version) > 18 or not version.isascii() or not version.isdigit() or int(version) == 0:
        raise InvalidArgument(f"model_version must be a positive number, got {version[:40]!a}")
    return int(version)
