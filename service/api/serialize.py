"""Page cursors of the API; the wire views of rows live with storage (:mod:`bocompress.service.db.views`)."""

from __future__ import annotations

import base64

from bocompress.service.api.errors import APIError
from bocompress.service.db.views import iso, job_out, job_warnings, trial_out


# The base64url (unpadded) of "v1:" + 1 to 18 decimal digits, the only cursors encode_cursor
# makes and decode_cursor takes: "djE6" is "v1:", each three digits are four characters, and a
# last one or two digits are two or three (the OpenAPI document states this pattern, and the
# routes enforce it, so a cursor the schema allows is one the service accepts). 18 digits keep
# every value inside the 64-bit integers both databases compare.
_D3 = "(?:M[DTjz]|N[DTjz]|O[DT])[AEIMQUYcgk][w-z0-5]"  # three digits
_D2 = "(?:M[DTjz]|N[DTjz]|O[DT])[AEIMQUYcgk]"  # two digits, at the end
_D1 = "(?:M[AQgw]|N[AQgw]|O[AQ])"  # one digit, at the end
CURSOR_PATTERN = f"^(?:djE6(?:{_D3}){{0,5}}(?:{_D3}|{_D2}|{_D1}))?$"


def encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{value}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, value = raw.split(":", 1)
        if tag != "v1":
            raise ValueError
        return int(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(422, "cursor: not a cursor this service issued", "invalid") from exc


__all__ = ["CURSOR_PATTERN", "decode_cursor", "encode_cursor", "iso", "job_out", "job_warnings", "trial_out"]
