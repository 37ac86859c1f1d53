"""Tenant API keys: generation, parsing and salted hashing (the store keeps only the hash).

A key reads ``ds-<key_id>.<secret>``. ``key_id`` is public and indexes the row, so a lookup costs one
hash verification instead of one per stored key. The secret is 256 random bits; it is still hashed
with scrypt (a salt per key) so that a leaked database does not hand out working keys.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_PREFIX = "ds-"
_KEY_RE = re.compile(r"^ds-([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
# scrypt cost: 4 MiB, ~10-50 ms per hash. The secret has 256 random bits, so the work factor is not what
# stops guessing (as it would be for a password); it only has to make a stolen table useless, and the
# server verifies on its event loop. The store also caches verified keys: one hash per key and process.
_SCRYPT = dict(n=2**12, r=8, p=1, maxmem=16 * 2**20, dklen=32)


@dataclass(frozen=True)
class NewKey:
    key_id: str
    plaintext: str  # shown to the caller once, never stored
    salt: bytes
    digest: bytes


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return NewKey(key_id, f"{_PREFIX}{key_id}.{secret}", salt, _hash(secret, salt))


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, None for anything else."""
    match = _KEY_RE.match(plaintext)
    return (match.group(1), match.group(2)) if match else None


def verify(secret: str, salt: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(_hash(secret, salt), digest)
