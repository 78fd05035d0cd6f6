"""HMAC-SHA256 signing shared by checkpoints and model versions.

The key comes from the environment or a mounted Secret and is never stored beside what it
signs. Verification is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sign(key: bytes, data: bytes) -> str:
    """Hex HMAC-SHA256 of ``data`` under ``key``."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def verify(key: bytes, data: bytes, signature: str) -> bool:
    """True when ``signature`` is the HMAC of ``data`` under ``key`` (constant time)."""
    return hmac.compare_digest(sign(key, data), signature)
