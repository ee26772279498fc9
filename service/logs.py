"""Structured (JSON-lines) logs, quiet by default."""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "warning") -> None:
    """JSON lines on stderr for bocompress's loggers and uvicorn's, at ``level``."""
    for name in ("bocompress", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        if not any(getattr(h, "_bocompress", False) for h in logger.handlers):
            for h in list(logger.handlers):
                logger.removeHandler(h)
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(JsonFormatter())
            h._bocompress = True  # type: ignore[attr-defined]
            logger.addHandler(h)
        logger.propagate = False
