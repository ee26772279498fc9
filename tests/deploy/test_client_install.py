"""``pip install bocompress`` is the client: httpx and pydantic, no torch, SQLAlchemy or FastAPI.

A notebook or a batch script that only talks to a service must not pull the engine. The wheel built
from this checkout is installed into a fresh venv, as a user would (its dependencies resolved by pip
from the package index), and inspected there: what got installed, that ``bocompress.Client`` works,
and that no top-level ``service``, ``worker`` or ``migrations`` landed on the import path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.e2e.helpers import REPO_ROOT

HEAVY = {"torch", "sqlalchemy", "fastapi", "botorch", "gpytorch", "uvicorn", "alembic", "psycopg", "numpy"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = dist.glob("bocompress-*.whl")
    return whl


def _requires(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def test_the_base_requirements_are_the_client_only(wheel: Path) -> None:
    reqs = _requires(wheel)
    base = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower() for r in reqs
            if "extra ==" not in r}
    assert base == {"httpx", "pydantic", "typer", "tqdm", "pyyaml"}, base
    extras = {r.split("extra ==")[1].strip().strip("'\"") for r in reqs if "extra ==" in r}
    assert {"service", "worker", "notebook", "all", "dev"} <= extras, extras
    service = {r.split(">")[0].split("[")[0].strip().lower() for r in reqs if "extra == \"service\"" in r}
    assert {"fastapi", "sqlalchemy", "torch", "botorch"} <= service, service


def test_a_fresh_client_install_stays_light(wheel: Path, tmp_path: Path) -> None:
    # nothing of this checkout may leak in (PYTHONPATH would show its folders and its egg-info)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("BOCOMPRESS_")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # this environment's pip installs into the fresh venv (--python); the dependencies come from the
    # package index as for any user
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                           "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    if inst.returncode != 0 and "No matching distribution" in inst.stderr + inst.stdout:
        pytest.skip(f"the package index is unreachable: {inst.stderr[-500:]}")
    assert inst.returncode == 0, inst.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "list", "--format", "json"],
                            capture_output=True, text=True, timeout=120, check=True, env=env, cwd=tmp_path)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "bocompress" in names and "httpx" in names and "pydantic" in names
    assert not names & HEAVY, f"the client install pulled {sorted(names & HEAVY)}"
    probe = ("import importlib.util as u, bocompress; print(bocompress.Client.__name__); "
             "print([m for m in ('service', 'worker', 'migrations') if u.find_spec(m)]); "
             "import sys; print(sorted(m for m in ('torch', 'sqlalchemy', 'fastapi') if m in sys.modules))")
    res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[:3] == ["Client", "[]", "[]"], res.stdout
    # the CLI runs, and a command that needs the service says which extra to install
    cli = venv / "bin" / "bocompress"
    assert subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120, env=env).returncode == 0
    serve = subprocess.run([str(cli), "migrate", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert serve.returncode != 0 and "bocompress[service]" in serve.stderr + serve.stdout, serve
