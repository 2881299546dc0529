"""Content-addressed artifact files under one directory, optionally encrypted at rest.

ArtifactStore is the small interface an object store would implement too.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fovea import crypto
from fovea.errors import IntegrityError
from fovea.names import check_sha256


class ArtifactStore(Protocol):
    """Where artifacts live: put by digest, read back in chunks. An object store would implement this too."""

    def put(self, data: bytes, sha256: str) -> bool:
        """Store the plaintext under its digest; returns True when it is encrypted at rest."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def read_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        """The stored bytes (ciphertext when encrypted); raises IntegrityError when missing."""
        ...

    def reencrypt(self) -> Reencrypted:
        """Rewrite every artifact under the current key (the end of a key rotation)."""
        ...


@dataclass
class Reencrypted:
    rewritten: int = 0
    """Artifacts that were under another key, or plaintext, and are now under the current key."""
    unchanged: int = 0
    """Artifacts already under the current key."""
    unreadable: list[str] = field(default_factory=list)
    """Digests of artifacts no known key opens (or whose content does not match its digest)."""


class LocalArtifactStore:
    """Files at ROOT/ab/abcdef... named by the SHA-256 of the plaintext."""

    def __init__(self, root: pathlib.Path, key: bytes | None = None, previous_keys: Sequence[bytes] = ()) -> None:
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.previous_keys = list(previous_keys)

    def path(self, sha256: str) -> pathlib.Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, sha256: str) -> bool:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("artifact digest mismatch")
        target = self.path(sha256)
        if target.exists() and self._stored_encrypted(target) == bool(self.key):
            return bool(self.key)
        # Missing, or stored before encryption was switched on (or off): (re)write it.
        self._write(target, crypto.encrypt(self.key, data, sha256) if self.key else data)
        return bool(self.key)

    @staticmethod
    def _write(target: pathlib.Path, blob: bytes) -> None:
        """Write then rename, so a crash never leaves a partial file under the final name."""
        target.parent.mkdir(parents=True, exist_ok=True)
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

    def reencrypt(self) -> Reencrypted:
        if self.key is None:
            raise ValueError("no current encryption key: set encryption_key_file before re-encrypting")
        out = Reencrypted()
        for path in sorted(self.root.glob("??/*")):
            if path.name.startswith(".tmp-") or len(path.name) != 64:
                continue
            sha256 = path.name
            blob = path.read_bytes()
            try:
                crypto.decrypt(self.key, blob, sha256)
                if crypto.is_encrypted(blob):
                    out.unchanged += 1
                    continue
            except IntegrityError:
                pass
            try:
                data = crypto.decrypt(self.previous_keys, blob, sha256)
            except IntegrityError:
                out.unreadable.append(sha256)
                continue
            if hashlib.sha256(data).hexdigest() != sha256:
                out.unreadable.append(sha256)
                continue
            self._write(path, crypto.encrypt(self.key, data, sha256))
            out.rewritten += 1
        return out

    @staticmethod
    def _stored_encrypted(path: pathlib.Path) -> bool:
        with open(path, "rb") as f:
            return crypto.is_encrypted(f.read(len(crypto.MAGIC)))

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def read_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        try:
            f = open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise IntegrityError(f"artifact {sha256[:16]}... is missing from the artifact store") from None
        with f:
            while chunk := f.read(chunk_bytes):
                yield chunk
