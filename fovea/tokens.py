"""Service tokens: which kind of Fovea service a caller is, from the bearer token it presents.

Each kind of service (worker, gateway) has its own tokens, so that each gets only the calls it needs
(registry/service.py). A setting lists the tokens accepted now, comma-separated, so that a token is
rotated without a stop: add the new one, roll the services that send it, remove the old one.

An entry is the token itself or "sha256:" and the token's SHA-256 in hex, so that the registry need
not hold the secret. Every entry is kept as a digest; a presented token is hashed once and compared
with every entry in constant time, with no early exit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SHA256_PREFIX = "sha256:"
MIN_TOKEN_CHARS = 16
API_KEY_PREFIX = "fv_"


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_list(value: str) -> list[str]:
    """The entries of a comma-separated setting, blanks dropped."""
    return [t.strip() for t in value.split(",") if t.strip()]


def check_plain_token(token: str, setting: str) -> None:
    """Raise ValueError for a token too short to be a secret, or one that reads as an API key."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{setting}: a service token needs at least {MIN_TOKEN_CHARS} characters")
    if token.startswith(API_KEY_PREFIX) or token.startswith(SHA256_PREFIX):
        raise ValueError(f"{setting}: a service token may not start with {API_KEY_PREFIX!r} or {SHA256_PREFIX!r}")
    if not token.isascii() or not token.isprintable() or "," in token:
        raise ValueError(f"{setting}: a service token is printable ASCII without commas")


def entry_digest(entry: str, setting: str) -> bytes:
    """The digest an accepted-token entry stands for: given as sha256:HEX, or hashed here."""
    if entry.startswith(SHA256_PREFIX):
        hex_digest = entry[len(SHA256_PREFIX) :].lower()
        if len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
            raise ValueError(f"{setting}: {SHA256_PREFIX!r} must be followed by 64 hex digits")
        return bytes.fromhex(hex_digest)
    check_plain_token(entry, setting)
    return token_digest(entry)


class TokenTable:
    """Accepted tokens by kind of service; kind_of() names the kind a presented token belongs to."""

    def __init__(self, lists: Mapping[str, str]) -> None:
        """lists: kind -> comma-separated entries. Raises ValueError for a bad entry or one token under two kinds."""
        self.entries: list[tuple[bytes, str]] = []
        kinds: dict[bytes, str] = {}
        for kind, value in lists.items():
            for entry in token_list(value):
                digest = entry_digest(entry, f"{kind} tokens")
                if kinds.get(digest, kind) != kind:
                    raise ValueError(f"one token is listed for both {kinds[digest]} and {kind}: give each its own")
                kinds[digest] = kind
                self.entries.append((digest, kind))

    def kind_of(self, presented: str) -> str | None:
        digest = token_digest(presented)
        found = None
        for accepted, kind in self.entries:  # every entry, whatever matched: the time says nothing
            if hmac.compare_digest(digest, accepted):
                found = kind
        return found

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, kind in self.entries:
            out[kind] = out.get(kind, 0) + 1
        return out
