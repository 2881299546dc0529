"""AES-256-GCM encryption of artifacts at rest; the key never leaves its file or secret.

Two formats, both read:
  FOVEAENC1  MAGIC | nonce (12) | one GCM ciphertext of the whole file. Reading it needs the whole
             file in memory; written before issue 18, it is never written any more.
  FOVEAENC2  MAGIC | nonce prefix (8) | chunk size (4, big-endian) | records. Record i is the GCM
             ciphertext (chunk + 16-byte tag) of plaintext chunk i, every chunk full but the last,
             under nonce prefix | i, with the file's digest, i and a last-chunk flag as associated
             data: records cannot be swapped, reordered, dropped or cut off at the end unnoticed.
             Written and read a chunk at a time, so memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import struct
from collections.abc import Iterator, Sequence
from typing import Protocol

from fovea.errors import IntegrityError

MAGIC = b"FOVEAENC1"
MAGIC_CHUNKED = b"FOVEAENC2"
NONCE_BYTES = 12
PREFIX_BYTES = 8
TAG_BYTES = 16
CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024
"""Largest chunk size a reader accepts from a header (a tampered header must not make it allocate more)."""
Keys = bytes | Sequence[bytes] | None


class Readable(Protocol):
    """What the streams read from: a binary file, or anything with its read()."""

    def read(self, size: int = -1, /) -> bytes: ...


def load_key(path: str | pathlib.Path) -> bytes:
    """A 32-byte key from a file holding raw bytes, 64 hex characters or base64."""
    raw = pathlib.Path(path).read_bytes()
    if len(raw) == 32:
        return raw
    text = raw.strip()
    for decode in (binascii.unhexlify, base64.b64decode):
        try:
            key = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    raise ValueError(f"{path}: expected a 32-byte AES-256 key (raw, hex or base64)")


def load_keys(current_file: str, previous_file: str = "") -> list[bytes]:
    """The current key (first: it encrypts) and, while a rotation is under way, the previous one
    (it only decrypts). An empty previous file means no rotation is under way."""
    keys = [load_key(current_file)] if current_file else []
    if previous_file and pathlib.Path(previous_file).read_bytes().strip():
        if not keys:
            raise ValueError("a previous encryption key needs a current one (encryption_key_file)")
        keys.append(load_key(previous_file))
    return keys


def is_encrypted(blob: bytes) -> bool:
    return blob[: len(MAGIC)] in (MAGIC, MAGIC_CHUNKED)


def _candidates(keys: Keys) -> list[bytes]:
    candidates = [keys] if isinstance(keys, bytes) else list(keys or [])
    if not candidates:
        raise IntegrityError(
            "artifact is encrypted at rest and this process has no decryption key (set the encryption key file)"
        )
    return candidates


def _chunk_aad(sha256: str, index: int, last: bool) -> bytes:
    return sha256.encode() + struct.pack(">IB", index, last)


def encrypt_stream(key: bytes, src: Readable, sha256: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The FOVEAENC2 file of src's bytes, a header then one record per chunk read."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(key)
    prefix = os.urandom(PREFIX_BYTES)
    yield MAGIC_CHUNKED + prefix + struct.pack(">I", chunk_bytes)
    chunk = src.read(chunk_bytes)
    index = 0
    while True:
        following = src.read(chunk_bytes) if len(chunk) == chunk_bytes else b""
        last = not following
        nonce = prefix + struct.pack(">I", index)
        yield aead.encrypt(nonce, chunk, _chunk_aad(sha256, index, last))
        if last:
            return
        chunk, index = following, index + 1


def encrypt(key: bytes, plaintext: bytes, sha256: str) -> bytes:
    # The digest is bound as associated data, so a file cannot be swapped for another.
    return b"".join(encrypt_stream(key, io.BytesIO(plaintext), sha256))


def decrypt_stream(keys: Keys, src: Readable, sha256: str, plain_chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The plaintext of an artifact file, in chunks; tries each key (current, then previous).

    Plaintext files come back as they are. Raises IntegrityError, possibly after some chunks,
    when no key opens it or it was tampered with: callers must not trust what they got until
    the iterator ends.
    """
    magic = src.read(len(MAGIC))
    if magic == MAGIC:
        yield _decrypt_whole(keys, magic + src.read(), sha256)
        return
    if magic != MAGIC_CHUNKED:
        yield magic
        while chunk := src.read(plain_chunk_bytes):
            yield chunk
        return
    yield from _decrypt_chunks(keys, src, sha256)


def _decrypt_chunks(keys: Keys, src: Readable, sha256: str) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    candidates = _candidates(keys)
    header = src.read(PREFIX_BYTES + 4)
    if len(header) != PREFIX_BYTES + 4:
        raise IntegrityError("artifact decryption failed: truncated header")
    prefix, (chunk_bytes,) = header[:PREFIX_BYTES], struct.unpack(">I", header[PREFIX_BYTES:])
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise IntegrityError("artifact decryption failed: tampered header")
    record_bytes = chunk_bytes + TAG_BYTES
    record = src.read(record_bytes)
    aead = None
    index = 0
    while True:
        following = src.read(record_bytes) if len(record) == record_bytes else b""
        nonce = prefix + struct.pack(">I", index)
        aad = _chunk_aad(sha256, index, not following)
        opened = None
        for candidate in [aead] if aead else [AESGCM(k) for k in candidates]:
            try:
                opened = candidate.decrypt(nonce, record, aad)
                aead = candidate
                break
            except InvalidTag:
                continue
        if opened is None:
            raise IntegrityError("artifact decryption failed: wrong key or tampered file")
        yield opened
        if not following:
            return
        record, index = following, index + 1


def _decrypt_whole(keys: Keys, blob: bytes, sha256: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    for key in _candidates(keys):
        try:
            return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], sha256.encode())
        except InvalidTag:
            continue
    raise IntegrityError("artifact decryption failed: wrong key or tampered file")


def decrypt(keys: Keys, blob: bytes, sha256: str) -> bytes:
    """The plaintext of an artifact held in memory (either format); tries each key in turn."""
    if not is_encrypted(blob):
        return blob
    return b"".join(decrypt_stream(keys, io.BytesIO(blob), sha256))
