"""What storage raises, mapped to HTTP answers by ``bocompress.service.api.errors`` (no HTTP here)."""

from __future__ import annotations

from typing import Any

from bocompress.service.db.session import StorageError


class TransitionError(Exception):
    """A guarded update matched no row, or a request conflicts with a row's state (a 409 at the API)."""

    def __init__(self, message: str, code: str = "conflict", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: HTTP headers the answer carries (``Retry-After`` for a conflict that passes).
        self.headers = headers


class NotFound(Exception):
    """No such row, or not one the caller may see (a 404)."""

    def __init__(self, what: str, ident: Any) -> None:
        super().__init__(f"{what} {ident} not found")
        self.what = what


class Invalid(Exception):
    """A value storage was asked to keep is not acceptable (a 422 whose ``detail`` names the field)."""

    def __init__(self, detail: str, code: str = "invalid") -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code

    @classmethod
    def field(cls, name: str, reason: str) -> "Invalid":
        return cls(f"{name}: {reason}")


__all__ = ["Invalid", "NotFound", "StorageError", "TransitionError"]
