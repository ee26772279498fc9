"""Typed errors of the bocompress client.

The hierarchy follows openai-python's ``_exceptions.py``::

    BocompressError
    ├── WaitTimeoutError            a wait (job, artifact) ran past its timeout
    └── APIError                    anything about one HTTP exchange
        ├── APIConnectionError      no response: refused, reset, DNS, ...
        │   └── APITimeoutError     no response in time
        └── APIStatusError          a 4xx/5xx response
            ├── BadRequestError             400
            ├── AuthenticationError         401
            ├── PermissionDeniedError       403
            ├── NotFoundError               404
            ├── ConflictError               409
            ├── UnprocessableEntityError    422
            ├── RateLimitError              429
            └── InternalServerError         >= 500

The service answers errors as ``{"detail": "...", "code": "..."}``; both land on the exception
as ``detail`` and ``code``, so callers can branch on ``err.code`` and show ``err.detail``.
Only httpx is imported.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "BocompressError",
    "WaitTimeoutError",
    "APIError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "status_error",
]


class BocompressError(Exception):
    """Base of every error the bocompress client raises on purpose."""


class WaitTimeoutError(BocompressError, TimeoutError):
    """A wait (for a job to finish, for an artifact to be built) ran past its ``timeout``."""


class APIError(BocompressError):
    """An error tied to one HTTP request to the service.

    Attributes:
        message: A human-readable sentence (what the CLI prints after ``error:``).
        request: The ``httpx.Request`` that failed.
        body: The decoded JSON body of the response when there was one and it was JSON,
            its text when it was not, ``None`` when there was no response.
    """

    message: str
    request: httpx.Request
    body: object | None

    def __init__(self, message: str, request: httpx.Request, *, body: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIConnectionError(APIError):
    """The service could not be reached (refused, reset, name not resolved, bad scheme)."""

    def __init__(self, *, message: str = "Connection error.", request: httpx.Request) -> None:
        super().__init__(message, request, body=None)


class APITimeoutError(APIConnectionError):
    """The service did not answer within the client's timeout."""

    def __init__(self, request: httpx.Request, *, message: str | None = None) -> None:
        super().__init__(message=message or f"Request timed out: {request.method} {request.url}", request=request)


class APIStatusError(APIError):
    """The service answered with a 4xx or 5xx status.

    Attributes:
        status_code: The HTTP status.
        response: The ``httpx.Response``.
        request_id: The ``X-Request-ID`` response header, when the service set one (quote it
            when reporting a problem: it finds the request in the service's logs).
        code: The machine-readable ``code`` of the error body (e.g. ``"not_found"``), or ``None``.
        detail: The human-readable ``detail`` of the error body, or the raw text.
    """

    status_code: int
    response: httpx.Response
    request_id: str | None
    code: str | None
    detail: str

    def __init__(self, message: str, *, response: httpx.Response, body: object | None) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")
        self.code, self.detail = _code_and_detail(body, response)


class BadRequestError(APIStatusError):
    """400: the request was malformed."""


class AuthenticationError(APIStatusError):
    """401: no token, or an unknown or revoked one."""


class PermissionDeniedError(APIStatusError):
    """403: the token's role or owner does not allow this."""


class NotFoundError(APIStatusError):
    """404: no such job, trial, model or dataset (or not yours)."""


class ConflictError(APIStatusError):
    """409: the resource is not in a state that allows this (lease lost, job cancelled, ...)."""


class UnprocessableEntityError(APIStatusError):
    """422: the request body or query did not validate; ``detail`` names the field."""


class RateLimitError(APIStatusError):
    """429: too many requests."""


class InternalServerError(APIStatusError):
    """>= 500: the service failed (the client already retried)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def _format_detail(detail: Any) -> str:
    """Render a ``detail`` that may be a string or FastAPI's list of validation errors."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def _code_and_detail(body: object | None, response: httpx.Response) -> tuple[str | None, str]:
    if isinstance(body, dict):
        code = body.get("code")
        detail = body.get("detail")
        return (str(code) if code is not None else None,
                _format_detail(detail) if detail is not None else response.reason_phrase)
    if isinstance(body, str) and body.strip():
        return None, body.strip()[:500]
    return None, response.reason_phrase or f"HTTP {response.status_code}"


def status_error(response: httpx.Response) -> APIStatusError:
    """Build the typed error for a 4xx/5xx ``response`` (its body must be read).

    Args:
        response: A response with status >= 400.

    Returns:
        The matching :class:`APIStatusError` subclass, with a one-line message such as
        ``"job 7 not found (HTTP 404, not_found)"``.
    """
    try:
        body: object | None = response.json()
    except ValueError:
        body = response.text or None
    code, detail = _code_and_detail(body, response)
    tag = f"HTTP {response.status_code}" + (f", {code}" if code else "")
    message = " ".join(f"{detail} ({tag})".split())  # one line, whatever the server sent
    status = response.status_code
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIStatusError)
    return cls(message, response=response, body=body)
