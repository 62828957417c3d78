"""Bearer-token authentication (a FastAPI dependency): 401 without a token or with a malformed header, 403 with
a token that is not accepted (or when no token is configured at all)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from fastapi import HTTPException, Request, status


def bearer_token(request: Request, what: str) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 naming ``what`` when it is missing or malformed."""
    header = request.headers.get("authorization")
    if not header:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"{what}: missing bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer" or not supplied.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"{what}: malformed Authorization header, expected 'Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return supplied.strip()


def _matches(supplied: str, accepted: Iterable[str]) -> bool:
    # Every key is compared (no early exit), each in constant time.
    found = False
    for key in accepted:
        found |= hmac.compare_digest(supplied.encode(), key.encode())
    return found


def bearer_auth(get_tokens: Callable[[], Iterable[str]], what: str) -> Callable[[Request], str]:
    """A dependency accepting any token of ``get_tokens()``; answers the token so routes can tell callers apart.

    With no token configured every request is refused (403): an endpoint guarded by an empty list of secrets
    would otherwise be open to anyone.
    """

    def dependency(request: Request) -> str:
        supplied = bearer_token(request, what)
        accepted = [t for t in get_tokens() if t]
        if not accepted:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"{what} disabled: no token configured")
        if not _matches(supplied, accepted):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"{what}: wrong token")
        return supplied

    return dependency


def admin_auth(get_token: Callable[[], str | None]) -> Callable[[Request], str]:
    """The admin endpoints' dependency: one token (``AdminTokenSettings.resolved_admin_token``)."""

    def tokens() -> list[str]:
        token = get_token()
        return [token] if token else []

    return bearer_auth(tokens, "admin endpoint")
