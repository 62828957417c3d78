"""Bearer-token authentication of the admin endpoints: 401 without a token, 403 with a wrong one."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import HTTPException, Request, status


def admin_auth(get_token: Callable[[], str | None]) -> Callable[[Request], None]:
    """A FastAPI dependency checking ``Authorization: Bearer <token>`` against ``get_token()``.

    With no token configured every admin request is refused (403): an admin endpoint without a secret would
    let anyone swap the weights.
    """

    def dependency(request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="admin endpoint: missing bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not supplied.strip():
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="admin endpoint: malformed Authorization header, expected 'Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        expected = get_token()
        if not expected:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="admin endpoint disabled: no admin token configured")
        if not hmac.compare_digest(supplied.strip().encode(), expected.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="admin endpoint: wrong token")

    return dependency
