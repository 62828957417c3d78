"""The one error type of the services' HTTP APIs: raised anywhere below a route, answered by one handler
(:func:`services.common.app.create_service_app`) as ``{"detail": message}`` with the status, plus
``Retry-After`` when the caller may try again later."""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}
