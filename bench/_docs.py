"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table here is written by a script under `bench/`; rerun it to refresh its section.\n"


def write_section(name: str, title: str, body: str, key: str | None = None) -> Path:
    """Replace (or append) the section delimited by ``<!-- key:start -->`` / ``<!-- key:end -->``."""
    key = key or name
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"{start}\n{title}\n\n_Measured {stamp} by `bench/{name.replace('-', '_')}.py`._\n\n{body}\n{end}\n"
    text = DOC.read_text() if DOC.exists() else HEADER
    if start in text and end in text:
        a = text.index(start)
        b = text.index(end) + len(end)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return DOC
