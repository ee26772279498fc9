#!/usr/bin/env python3
"""Container health check: GET a bocompress ``/healthz`` and exit 0 only on HTTP 200 with status "ok".

Used by both images (python:3.11-slim has no curl):

* service: ``bocompress-healthcheck http://127.0.0.1:8000/healthz`` (the process answers and its
  database is reachable: ``/healthz`` answers 503 when it is not);
* worker: ``bocompress-healthcheck`` with no argument checks ``$BOCOMPRESS_URL/healthz``, i.e. that
  this worker can reach the service it leases trials from.

Only the standard library is imported, so a check costs a few milliseconds, not a torch import.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 4.0


def health_url(argv: list[str], environ: dict[str, str]) -> str:
    """The URL to check: the first argument, else ``$BOCOMPRESS_URL/healthz``.

    Args:
        argv: The command-line arguments after the program name.
        environ: The process environment.

    Returns:
        An absolute http(s) URL ending in ``/healthz`` when derived from the environment.
    """
    if argv:
        return argv[0]
    base = (environ.get("BOCOMPRESS_URL") or DEFAULT_URL).strip().rstrip("/")
    return f"{base}/healthz"


def check(url: str, timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """GET ``url`` and judge the answer.

    Args:
        url: The ``/healthz`` URL.
        timeout: Seconds to wait for the answer.

    Returns:
        ``(healthy, message)``: healthy when the answer is 200 with JSON ``{"status": "ok", ...}``.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - URL from the operator
            body = resp.read(65536)
            status = resp.status
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: unreachable ({exc})"
    try:
        payload = json.loads(body)
    except ValueError:
        return False, f"{url}: HTTP {status}, body is not JSON"
    if status == 200 and isinstance(payload, dict) and payload.get("status") == "ok":
        return True, f"{url}: ok (database: {payload.get('database')}, auth: {payload.get('auth')})"
    return False, f"{url}: HTTP {status}, {payload!r}"


def main(argv: list[str] | None = None) -> int:
    """Run the check; print one line; exit status 0 (healthy) or 1 (unhealthy)."""
    url = health_url(sys.argv[1:] if argv is None else argv, dict(os.environ))
    ok, message = check(url)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
