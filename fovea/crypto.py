"""AES-256-GCM encryption of artifacts at rest; the key never leaves its file or secret."""

from __future__ import annotations

import base64
import binascii
import os
import pathlib
from collections.abc import Sequence

from fovea.errors import IntegrityError

MAGIC = b"FOVEAENC1"
NONCE_BYTES = 12


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
    return blob[: len(MAGIC)] == MAGIC


def encrypt(key: bytes, plaintext: bytes, sha256: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    # The digest is bound as associated data, so a file cannot be swapped for another.
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, sha256.encode())


def decrypt(keys: bytes | Sequence[bytes] | None, blob: bytes, sha256: str) -> bytes:
    """The plaintext of an artifact; tries each key (current, then previous) in turn."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not is_encrypted(blob):
        return blob
    candidates = [keys] if isinstance(keys, bytes) else list(keys or [])
    if not candidates:
        raise IntegrityError(
            "artifact is encrypted at rest and this process has no decryption key (set the encryption key file)"
        )
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    for key in candidates:
        try:
            return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], sha256.encode())
        except InvalidTag:
            continue
    raise IntegrityError("artifact decryption failed: wrong key or tampered file")
