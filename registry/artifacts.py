"""Content-addressed artifact files under one directory, optionally encrypted at rest.

ArtifactStore is the small interface an object store would implement too. Uploads are written
to a temporary file in the store while they arrive and are hashed on the way (Upload), validated
from that file, then moved (or encrypted, a chunk at a time) under their digest: memory stays
bounded by a chunk, whatever the artifact's size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from fovea import crypto
from fovea.errors import IntegrityError
from fovea.names import check_sha256

logger = logging.getLogger(__name__)

UPLOAD_PREFIX = ".upload-"
STALE_UPLOAD_S = 24 * 3600
"""A temporary upload file older than this was left by a crash (an upload that slow would have
timed out long before): removed when a store opens the directory."""


class Upload:
    """An artifact being received: appended to a temporary file while its SHA-256 is computed."""

    def __init__(self, directory: pathlib.Path) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=UPLOAD_PREFIX)
        self.path = pathlib.Path(name)
        self.file: BinaryIO | None = os.fdopen(fd, "wb")
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        """Flush to disk and close; the file is then read (validation), never written again."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        """Remove the temporary file unless the store took it; safe to call more than once."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class ArtifactStore(Protocol):
    """Where artifacts live: put by digest, read back in chunks. An object store would implement this too."""

    def begin_upload(self) -> Upload:
        """A temporary file for an artifact as it arrives."""
        ...

    def put_upload(self, upload: Upload) -> bool:
        """Store a finished upload under its digest (taking its file); returns True when encrypted at rest."""
        ...

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


def _checked(chunks: Iterable[bytes], sha256: str) -> Iterator[bytes]:
    """Pass chunks through; raise IntegrityError at the end when they do not hash to sha256."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    if digest.hexdigest() != sha256:
        raise IntegrityError("artifact content does not match its digest")


class LocalArtifactStore:
    """Files at ROOT/ab/abcdef... named by the SHA-256 of the plaintext."""

    def __init__(self, root: pathlib.Path, key: bytes | None = None, previous_keys: Sequence[bytes] = ()) -> None:
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.previous_keys = list(previous_keys)
        self._remove_stale_uploads()

    def path(self, sha256: str) -> pathlib.Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def _remove_stale_uploads(self) -> None:
        # Only old ones: replicas sharing this directory may be receiving uploads right now.
        cutoff = time.time() - STALE_UPLOAD_S
        for path in self.root.glob(UPLOAD_PREFIX + "*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    logger.info("removed %s, an upload a crash left behind", path.name)
            except FileNotFoundError:
                pass

    def begin_upload(self) -> Upload:
        return Upload(self.root)

    def put_upload(self, upload: Upload) -> bool:
        upload.finish()
        target = self.path(upload.sha256)
        if self._current(target):
            upload.discard()
            return bool(self.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.key:
            with open(upload.path, "rb") as src:
                self._write_chunks(target, crypto.encrypt_stream(self.key, src, upload.sha256))
            upload.discard()
        else:
            os.replace(upload.path, target)  # same directory tree, so an atomic rename
        return bool(self.key)

    def put(self, data: bytes, sha256: str) -> bool:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("artifact digest mismatch")
        target = self.path(sha256)
        if self._current(target):
            return bool(self.key)
        chunks = crypto.encrypt_stream(self.key, io.BytesIO(data), sha256) if self.key else [data]
        self._write_chunks(target, chunks)
        return bool(self.key)

    def _current(self, target: pathlib.Path) -> bool:
        """Stored already, encrypted or not as this store writes it now (else it is (re)written:
        missing, or stored before encryption was switched on or off)."""
        return target.exists() and self._stored_encrypted(target) == bool(self.key)

    @staticmethod
    def _write_chunks(target: pathlib.Path, chunks: Iterable[bytes]) -> None:
        """Write then rename, so a crash never leaves a partial file under the final name."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    def _opens(self, path: pathlib.Path, keys: Sequence[bytes], sha256: str) -> bool:
        """Whether keys decrypt the file to content with this digest (read a chunk at a time)."""
        try:
            with open(path, "rb") as f:
                for _ in _checked(crypto.decrypt_stream(keys, f, sha256), sha256):
                    pass
            return True
        except IntegrityError:
            return False

    def reencrypt(self) -> Reencrypted:
        if self.key is None:
            raise ValueError("no current encryption key: set encryption_key_file before re-encrypting")
        out = Reencrypted()
        for path in sorted(self.root.glob("??/*")):
            if path.name.startswith(".tmp-") or len(path.name) != 64:
                continue
            sha256 = path.name
            if self._stored_encrypted(path) and self._opens(path, [self.key], sha256):
                out.unchanged += 1
                continue
            try:
                with open(path, "rb") as src:
                    plain = _checked(crypto.decrypt_stream(self.previous_keys, src, sha256), sha256)
                    self._write_chunks(path, crypto.encrypt_stream(self.key, _Reader(plain), sha256))
            except IntegrityError:
                out.unreadable.append(sha256)
                continue
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


class _Reader(io.RawIOBase):
    """A file-like view of an iterator of chunks, so that encrypt_stream can read a decrypted stream."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""
        self.offset = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.pending) - self.offset < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.pending = self.pending[self.offset :] + chunk
            self.offset = 0
        end = len(self.pending) if size < 0 else min(len(self.pending), self.offset + size)
        out = self.pending[self.offset : end]
        self.offset = end
        return out
