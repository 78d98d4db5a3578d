"""API key format: `gph_` + 24 random base62 characters (~142 bits) + a 6-character checksum.

The checksum (CRC32 of the random part, base62) lets the gateway reject typos and
garbage without touching the database. Only the sha256 of a key is stored.
"""

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass

PREFIX = "gph_"
ALPHABET = string.digits + string.ascii_letters
RANDOM_CHARS = 24
CHECKSUM_CHARS = 6
KEY_LENGTH = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_CHARS)


@dataclass(frozen=True)
class NewKey:
    secret: str  # shown to the user once, never stored
    sha256: str
    prefix: str
    last_four: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate() -> NewKey:
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    key = PREFIX + body + _checksum(body)
    return NewKey(secret=key, sha256=hash_key(key), prefix=key[:8], last_four=key[-4:])


def well_formed(key: str) -> bool:
    """True when `key` has the gph_ shape and a valid checksum."""
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    body, check = key[len(PREFIX) : -CHECKSUM_CHARS], key[-CHECKSUM_CHARS:]
    if any(c not in ALPHABET for c in body):
        return False
    return hmac.compare_digest(_checksum(body), check)


def matches(key: str, stored_sha256: str) -> bool:
    """Constant-time comparison of a presented key against a stored hash."""
    return hmac.compare_digest(hash_key(key), stored_sha256)
