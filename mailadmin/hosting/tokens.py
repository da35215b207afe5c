"""The API token format: ``mat_<prefix>_<secret>``, kept only as the SHA-256 of the whole token.

The secret is 256 random bits, so a plain SHA-256 is enough to keep (no key, no slow hash):
nobody can find a token from its digest, and checking one costs microseconds per request. The
prefix is random too, names the token in lists, logs and ``revoketoken``, and finds its row.
"""

import hashlib
import secrets
from dataclasses import dataclass

MARK = "mat_"
PREFIX_BYTES = 4  # 8 hex digits
SECRET_BYTES = 32  # 256 bits
_PREFIX_END = len(MARK) + 2 * PREFIX_BYTES


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    prefix: str
    digest: str


def issue() -> IssuedToken:
    prefix = secrets.token_hex(PREFIX_BYTES)
    token = f"{MARK}{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return IssuedToken(token, prefix, digest(token))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def prefix_of(token: str) -> str | None:
    """The prefix of something shaped like a token, or None."""
    if not token.startswith(MARK) or token[_PREFIX_END : _PREFIX_END + 1] != "_":
        return None
    prefix = token[len(MARK) : _PREFIX_END]
    return prefix if all(char in "0123456789abcdef" for char in prefix) else None


def matches(token: str, stored_digest: str) -> bool:
    return secrets.compare_digest(digest(token), stored_digest)
