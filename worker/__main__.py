"""``python -m bocompress.worker --url URL --token TOKEN --device cpu|cuda|cuda:N``: run a worker.

The same as ``bocompress worker``, without Typer: the entry point of worker containers.
Exits 0 after a clean stop (SIGTERM/SIGINT, or ``--max-trials`` reached), 2 on bad arguments and
1 when the service refuses the token.
"""

from __future__ import annotations

import argparse
import os
import sys

from bocompress.errors import BocompressError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, configure JSON logs on stderr and run :func:`bocompress.worker.loop.run_worker`."""
    parser = argparse.ArgumentParser(prog="python -m bocompress.worker", description="Run a bocompress worker.")
    parser.add_argument("--url", default=os.environ.get("BOCOMPRESS_URL"),
                        help="service URL (env BOCOMPRESS_URL; default http://127.0.0.1:8000)")
    parser.add_argument("--token", default=os.environ.get("BOCOMPRESS_TOKEN"),
                        help="worker token (env BOCOMPRESS_TOKEN; none for a service without auth)")
    parser.add_argument("--device", default=os.environ.get("BOCOMPRESS_WORKER_DEVICE", "cpu"),
                        help="torch device: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--name", default=None, help="worker name shown on trials (default host:pid)")
    parser.add_argument("--max-trials", type=int, default=None, help="exit after this many tasks")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between lease requests when idle")
    parser.add_argument("--grace", type=float, default=None,
                        help="seconds a stopping worker lets the current task finish (default 20)")
    parser.add_argument("--allow-import", default=None,
                        help="comma-separated import-path prefixes for user models "
                             "(default env BOCOMPRESS_WORKER_ALLOW_IMPORT; none)")
    parser.add_argument("--log-level", default=os.environ.get("BOCOMPRESS_WORKER_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.max_trials is not None and args.max_trials < 1:
        parser.error("--max-trials must be >= 1")
    if not args.poll > 0:
        parser.error("--poll must be > 0")

    from bocompress.worker.logs import configure_logging
    from bocompress.worker.loop import DEFAULT_GRACE, run_worker

    configure_logging(args.log_level)
    prefixes = None if args.allow_import is None else [p.strip() for p in args.allow_import.split(",") if p.strip()]
    try:
        run_worker(url=args.url, token=args.token, device=args.device, name=args.name, max_trials=args.max_trials,
                   poll=args.poll, allowed_prefixes=prefixes,
                   grace=DEFAULT_GRACE if args.grace is None else args.grace)
    except BocompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
