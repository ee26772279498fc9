"""Print the requirements of the bocompress package with the given extras, one per line.

The images install the dependencies in a layer of their own (rebuilt only when pyproject.toml
changes), before the project itself: ``python docker/requirements.py service > /tmp/requirements.txt``.
Self-references (``bocompress[service,worker]``) are expanded.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The base dependencies and those of ``extras``, in order, without duplicates."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has {', '.join(sorted(optional))})")
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{project['name']}\[([\w,\s-]+)\]", req)
            if own:
                todo += [e.strip() for e in own.group(1).split(",")]
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(Path.cwd() / "pyproject.toml", sys.argv[1:])))
