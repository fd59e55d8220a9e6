"""Signatures of the event log's seals: HMAC-SHA256 with a key derived from the secret key.

The chains and seals hold no secret, so someone who can write the database and has this code
could re-hash everything after some point. A seal signed with a key the database does not hold
cannot be forged that way. The key is derived (HMAC of a fixed label under the secret key), never
the secret key itself, so a signature reveals nothing about the key that encrypts credentials.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

#: What the seal key is derived for; a new label is a new key.
_LABEL = b"pushworker event-log seals v1"


@dataclass(frozen=True)
class SealKey:
    """A derived signing key and its fingerprint (``key_id``: what a seal records)."""

    key: bytes
    key_id: str

    def sign(self, digest: str) -> str:
        return hmac.new(self.key, digest.encode("ascii"), hashlib.sha256).hexdigest()

    def verifies(self, digest: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(digest), signature)


def seal_key(secret_key: str | None) -> SealKey | None:
    """The seal key derived from ``secret_key`` (None: no secret key, seals go unsigned)."""
    if not secret_key:
        return None
    key = hmac.new(secret_key.encode("utf-8"), _LABEL, hashlib.sha256).digest()
    return SealKey(key, hashlib.sha256(key).hexdigest()[:16])
