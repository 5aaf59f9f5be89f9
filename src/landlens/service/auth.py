"""Write tokens: ``Authorization: Bearer <token>``, compared in constant time."""

from __future__ import annotations

import hmac

WRITES_DISABLED = "writes are disabled: start the server with a token"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check_token(expected: str | None, authorization: str | None) -> tuple[int, str] | None:
    """``None`` when the request may write, else ``(status, detail)``: 403 when the server
    has no token, 401 when the header is missing or wrong (constant-time comparison)."""
    if expected is None:
        return 403, WRITES_DISABLED
    given = bearer_token(authorization)
    if given is None:
        return 401, "missing token: send 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        return 401, "invalid token"
    return None


__all__ = ["WRITES_DISABLED", "bearer_token", "check_token"]
