"""API key secrets: random, shown once, stored as salted HMAC-SHA256 digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
KEY_ID_LEN = 12
SECRET_PREFIX = "fv_"


def new_secret() -> tuple[str, str]:
    """Returns (key_id, secret); the secret is fv_<key_id>_<43 random characters>."""
    key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LEN))
    return key_id, f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(secret: str) -> str | None:
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
        return None
    key_id, sep, rest = secret[len(SECRET_PREFIX) :].partition("_")
    if not sep or not rest or len(key_id) != KEY_ID_LEN or any(c not in KEY_ID_ALPHABET for c in key_id):
        return None
    return key_id


def digest(salt: bytes, secret: str) -> bytes:
    # Secrets carry 256 random bits, so a keyed fast hash is enough; a slow KDF
    # would only add latency to every cache miss.
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def matches(salt: bytes, stored: bytes, secret: str) -> bool:
    return hmac.compare_digest(digest(salt, secret), stored)
