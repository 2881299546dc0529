"""Content-addressed artifact files under one directory, optionally encrypted at rest.

ArtifactStore is the small interface an object store would implement too.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Protocol

from fovea import crypto
from fovea.names import check_sha256


class ArtifactStore(Protocol):
    def put(self, data: bytes, sha256: str) -> None: ...
    def exists(self, sha256: str) -> bool: ...
    def read_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]: ...


class LocalArtifactStore:
    """Files at ROOT/ab/abcdef... named by the SHA-256 of the plaintext."""

    def __init__(self, root: pathlib.Path, key: bytes | None = None) -> None:
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = key

    def path(self, sha256: str) -> pathlib.Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, sha256: str) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("artifact digest mismatch")
        target = self.path(sha256)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = crypto.encrypt(self.key, data, sha256) if self.key else data
        # Write then rename, so a crash never leaves a partial file under the final name.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def read_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            while chunk := f.read(chunk_bytes):
                yield chunk
