"""Encryption at rest a chunk at a time (FOVEAENC2, issue 18 fix 7): round trips at chunk edges,
tampering caught, and artifacts in the earlier one-piece format (FOVEAENC1) still read and rotated."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

import pytest

from fovea import crypto
from fovea.errors import IntegrityError
from registry.artifacts import LocalArtifactStore

CHUNK = 1024  # small chunks, so that a few KiB span several records


def _encrypted(key: bytes, data: bytes) -> tuple[bytes, str]:
    sha256 = hashlib.sha256(data).hexdigest()
    return b"".join(crypto.encrypt_stream(key, io.BytesIO(data), sha256, CHUNK)), sha256


def _one_piece(key: bytes, data: bytes, sha256: str) -> bytes:
    """An artifact as encrypt() wrote it before issue 18 (FOVEAENC1)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(crypto.NONCE_BYTES)
    return crypto.MAGIC + nonce + AESGCM(key).encrypt(nonce, data, sha256.encode())


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_chunked_round_trip_at_chunk_edges(size: int) -> None:
    key = os.urandom(32)
    data = os.urandom(size)
    blob, sha256 = _encrypted(key, data)
    assert blob.startswith(crypto.MAGIC_CHUNKED) and crypto.is_encrypted(blob)
    assert crypto.decrypt([os.urandom(32), key], blob, sha256) == data  # the second key opens it
    assert b"".join(crypto.decrypt_stream(key, io.BytesIO(blob), sha256)) == data


def test_tampered_reordered_or_cut_files_are_refused() -> None:
    key = os.urandom(32)
    data = os.urandom(3 * CHUNK + 5)
    blob, sha256 = _encrypted(key, data)
    header, record = len(crypto.MAGIC_CHUNKED) + crypto.PREFIX_BYTES + 4, CHUNK + crypto.TAG_BYTES
    records = [blob[header + i * record : header + (i + 1) * record] for i in range(4)]
    flipped = bytearray(blob)
    flipped[header + record + 3] ^= 1
    cases = {
        "a flipped bit": bytes(flipped),
        "two records swapped": blob[:header] + records[1] + records[0] + b"".join(records[2:]),
        "cut after a whole record": blob[:header] + b"".join(records[:2]),
        "the last record dropped": blob[:header] + b"".join(records[:3]),
        "a record appended": blob + records[1],
        "another file's digest": blob,
    }
    for what, bad in cases.items():
        digest = "0" * 64 if what == "another file's digest" else sha256
        with pytest.raises(IntegrityError):
            crypto.decrypt(key, bad, digest)
            pytest.fail(what)
    with pytest.raises(IntegrityError, match="no decryption key"):
        crypto.decrypt(None, blob, sha256)


def test_one_piece_artifacts_stay_readable_and_rotate_into_chunks(tmp_path: pathlib.Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    data = os.urandom(5000)
    sha256 = hashlib.sha256(data).hexdigest()
    legacy = _one_piece(old, data, sha256)
    assert crypto.decrypt(old, legacy, sha256) == data

    store = LocalArtifactStore(tmp_path, key=new, previous_keys=[old])
    path = store.path(sha256)
    path.parent.mkdir(parents=True)
    path.write_bytes(legacy)  # stored by a registry from before the chunked format
    done = store.reencrypt()
    assert (done.rewritten, done.unchanged, done.unreadable) == (1, 0, [])
    rotated = path.read_bytes()
    assert rotated.startswith(crypto.MAGIC_CHUNKED) and crypto.decrypt(new, rotated, sha256) == data
    assert b"".join(store.read_chunks(sha256, 777)) == rotated
    again = store.reencrypt()
    assert (again.rewritten, again.unchanged) == (0, 1)
    # A one-piece file already under the current key counts as unchanged and stays readable.
    path.write_bytes(_one_piece(new, data, sha256))
    assert store.reencrypt().unchanged == 1 and crypto.decrypt(new, path.read_bytes(), sha256) == data
