"""The import rules of docs/architecture.md, checked on the source (ast, no imports run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: What routers may import of storage: the interface, its errors, and (uploads, tokens and the
#: dashboard's bulk read, which are no part of a trial's state machine) sessions, models, read helpers.
ROUTER_DB_ALLOWED = {"bocompress.service.db.store", "bocompress.service.db.errors", "bocompress.service.db.session", "bocompress.service.db.models",
                     "bocompress.service.db.queries", "bocompress.service.db.views", "bocompress.service.db.migrate"}
#: The trial state machine's backends: routers never reach them.
BACKENDS = {"bocompress.service.db.trials", "bocompress.service.db.hot", "bocompress.service.db.hot_pg", "bocompress.service.db.sql_store",
            "bocompress.service.db.pg_store", "bocompress.service.db.proposals", "bocompress.service.db.exports"}
CONTRACT = ["schemas", "schemas_types", "schemas_profile", "schemas_trials", "states", "spec", "objective",
            "costs", "errors"]
HEAVY = ("torch", "sqlalchemy", "fastapi", "service", "worker", "numpy", "psycopg", "starlette")


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules ``path`` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _py(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _under(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n == prefix or n.startswith(prefix + ".")}


def test_routers_use_only_the_storage_interface() -> None:
    for path in _py("service/api") + _py("service/dashboard"):
        names = _imports(path)
        db = {n for n in _under(names, "bocompress.service.db") if n.count(".") == 2 or n in BACKENDS}
        db = {".".join(n.split(".")[:3]) for n in db}
        assert not (db & BACKENDS), f"{path.relative_to(ROOT)} imports a storage backend: {sorted(db & BACKENDS)}"
        assert db <= ROUTER_DB_ALLOWED, f"{path.relative_to(ROOT)} imports {sorted(db - ROUTER_DB_ALLOWED)}"


def test_the_worker_routes_hold_no_sql_and_no_backend_switch() -> None:
    for name in ("workers.py", "jobs.py", "exports.py"):
        src = (ROOT / "service/api" / name).read_text(encoding="utf-8")
        names = _imports(ROOT / "service/api" / name)
        assert not _under(names, "sqlalchemy"), f"service/api/{name} imports SQLAlchemy"
        assert not re.search(r"dialect|postgresql|sqlite|hot_pg|run_tx|read_session", src), name


def test_storage_never_imports_the_api() -> None:
    for path in _py("service/db") + [ROOT / "service/results.py", ROOT / "service/scheduler.py"]:
        assert not _under(_imports(path), "bocompress.service.api"), f"{path.relative_to(ROOT)} imports bocompress.service.api"
        assert not _under(_imports(path), "fastapi"), f"{path.relative_to(ROOT)} imports FastAPI"


def test_the_optimizer_knows_no_storage_nor_http() -> None:
    for path in _py("service/optimizer"):
        names = _imports(path)
        for layer in ("bocompress.service.api", "bocompress.service.db", "fastapi", "sqlalchemy"):
            assert not _under(names, layer), f"{path.relative_to(ROOT)} imports {layer}"


def test_the_contract_is_light() -> None:
    for name in CONTRACT:
        names = _imports(ROOT / "bocompress" / f"{name}.py")
        bad = {n for n in names if n.split(".")[0] in HEAVY}
        assert not bad, f"bocompress/{name}.py imports {sorted(bad)}"
        allowed_bocompress = {f"bocompress.{m}" for m in CONTRACT} | {"bocompress"}
        own = {".".join(n.split(".")[:2]) for n in _under(names, "bocompress")}
        assert own <= allowed_bocompress, f"bocompress/{name}.py imports {sorted(own - allowed_bocompress)}"


def test_the_client_loads_nothing_heavy_at_import() -> None:
    for name in ("client.py", "job.py", "uploads.py", "cli.py", "cli_support.py", "__init__.py"):
        top = _imports(ROOT / "bocompress" / name, top_level_only=True)
        bad = {n for n in top if n.split(".")[0] in HEAVY}
        assert not bad, f"bocompress/{name} imports {sorted(bad)} at import time"


def test_workers_never_import_the_service() -> None:
    """Workers talk to the service over HTTP only: none of its routers, storage or scheduler."""
    for path in _py("worker"):
        names = _imports(path)
        for layer in ("bocompress.service.api", "bocompress.service.db", "bocompress.service.scheduler", "bocompress.service.app", "bocompress.service.optimizer"):
            assert not _under(names, layer), f"{path.relative_to(ROOT)} imports {layer}"


def test_the_rules_written_once() -> None:
    """The metric default, the buffer rule and the constrained penalty each live in one place."""
    sources = {p: p.read_text(encoding="utf-8") for p in _py("service") + _py("bocompress")}
    patterns = {
        "metric default": r"""get\(["']metric["']\)\s*or""",
        "buffer rule": r"max_parallel\s*-\s*",
        "constrained penalty": r"1e6\s*\*|PENALTY\s*\*",
    }
    for what, pat in patterns.items():
        hits = [str(p.relative_to(ROOT)) for p, s in sources.items() if re.search(pat, s)]
        assert len(hits) == 1, f"{what} is written in {hits}"
    assert re.search(r"max_parallel\s*-", sources[ROOT / "bocompress/spec.py"])
    assert re.search(r"PENALTY\s*\*", sources[ROOT / "bocompress/objective.py"])
