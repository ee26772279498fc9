"""A stand-in worker: the worker's HTTP protocol with a synthetic L, no model code.

Run as a subprocess by the reliability tests (so it can be ``kill -9``-ed mid-trial)::

    python standin_worker.py --url URL --token TOKEN --name w1 --hold 0.5 --log results.jsonl

It loops lease -> (heartbeat while "computing" for ``--hold`` seconds) -> complete. Before it
asks for work it writes ``idle`` to ``--state-file``; once it holds a lease it writes
``busy <trial id>``, so a test knows when a kill lands mid-trial. Every answer to a
``complete`` is appended to ``--log`` as JSON (trial id, status, values sent), so a test can
check that every acknowledged result is in the database. Connection errors (a service restart)
are retried with backoff; a ``complete`` whose answer was lost is re-sent (it is idempotent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def synthetic_l(params: dict[str, float]) -> float:
    """Deterministic in the params, so a re-sent result is the same result."""
    return float(sum((1.0 - v) ** 2 for v in params.values()) / max(1, len(params)))


class Standin:
    def __init__(self, url: str, token: str, name: str, hold: float, log: Path | None, state_file: Path | None,
                 max_cycles: int, idle_exit: float) -> None:
        self.c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        self.name, self.hold, self.log, self.state_file = name, hold, log, state_file
        self.max_cycles, self.idle_exit = max_cycles, idle_exit

    def _state(self, text: str) -> None:
        if self.state_file is not None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.state_file)

    def _post(self, path: str, body: dict[str, Any], retry_for: float = 60.0) -> httpx.Response:
        """POST, retrying connection errors and 503 (the service is restarting) for ``retry_for`` s."""
        deadline = time.monotonic() + retry_for
        delay = 0.05
        while True:
            try:
                r = self.c.post(path, json=body)
                if r.status_code != 503:
                    return r
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: service unreachable for {retry_for} s ({path})")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def run(self) -> int:
        cycles = 0
        idle_since = time.monotonic()
        while cycles < self.max_cycles:
            self._state("idle")
            r = self._post("/api/v1/workers/lease", {"worker": self.name, "kinds": ["evaluate"]})
            if r.status_code == 204:
                if time.monotonic() - idle_since > self.idle_exit:
                    return 0
                time.sleep(0.05)
                continue
            r.raise_for_status()
            idle_since = time.monotonic()
            got = r.json()
            tid, tok = got["trial"]["id"], got["lease"]["token"]
            lease_s = float(got["lease"]["lease_seconds"])
            self._state(f"busy {tid}")
            end = time.monotonic() + self.hold
            lost = False
            while time.monotonic() < end:
                time.sleep(min(lease_s / 4, max(0.0, end - time.monotonic())))
                if time.monotonic() < end:
                    hb = self._post(f"/api/v1/trials/{tid}/heartbeat", {"lease_token": tok})
                    if hb.status_code == 409:
                        lost = True
                        break
            if lost:
                continue
            L = synthetic_l(got["trial"]["params"])
            body = {"values": {"distill_l2": L}, "sem": {"distill_l2": 0.01}, "lease_token": tok}
            r = self._post(f"/api/v1/trials/{tid}/complete", body)
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write(json.dumps({"trial": tid, "status": r.status_code, "distill_l2": L,
                                        "worker": self.name, "attempt": got["trial"]["attempt"]}) + "\n")
            cycles += 1
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--name", default=f"standin-{os.getpid()}")
    ap.add_argument("--hold", type=float, default=0.3, help="seconds each trial 'computes'")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--state-file", type=Path)
    ap.add_argument("--max-cycles", type=int, default=10**9)
    ap.add_argument("--idle-exit", type=float, default=1e9, help="exit after this long without work")
    a = ap.parse_args(argv)
    return Standin(a.url, a.token, a.name, a.hold, a.log, a.state_file, a.max_cycles, a.idle_exit).run()


if __name__ == "__main__":
    sys.exit(main())
