"""docker-compose.yml, the Dockerfiles and their scripts, checked against the code (no Docker engine).

Every command a container runs must parse as a real ``bocompress`` command; every ``BOCOMPRESS_*``
variable set must be one the code reads (``Settings`` fields, CLI ``envvar`` options, direct
``os.environ`` reads: all derived from the code); the worker reserves a GPU and scales; the schema
migration runs before the service; no secret is written in the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bocompress.cli import app

from .helpers import (
    COMPOSE_FILE,
    DOCKER_DIR,
    ROOT,
    MissingVariable,
    cli_commands,
    cli_envvars,
    command_argv,
    dockerfiles,
    dockerignore_patterns,
    environment,
    env_reads_in_code,
    interpolate,
    is_dockerignored,
    iter_bocompress_services,
    known_bocompress_env,
    load_compose,
    settings_env_names,
)

#: What compose would read from `.env` in the quick start of docs/deploy.md.
DOTENV = {"POSTGRES_PASSWORD": "0123456789abcdef", "BOCOMPRESS_WORKER_TOKEN": "bct_example"}
#: Variables a Dockerfile may set that are not bocompress settings: Python, pip and the NVIDIA
#: container runtime. Anything else must be a BOCOMPRESS_* variable the code reads.
RUNTIME_ENV_PREFIXES = ("PYTHON", "PIP_", "NVIDIA_")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(DOTENV)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_compose()


def _commands(compose: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(where, argv) for every container command: compose services and Dockerfile CMDs."""
    out = [(f"compose service {name!r}", command_argv(svc["command"]))
           for name, svc in compose["services"].items() if "command" in svc]
    for fname, df in dockerfiles().items():
        cmd = df.exec_form("CMD")
        if cmd:
            out.append((f"{fname} CMD", cmd))
    return out


def test_compose_has_the_four_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"postgres", "migrate", "service", "worker"}
    assert compose["services"]["postgres"]["image"].startswith("postgres:16")


def test_every_command_is_a_real_cli_command(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    cmds = cli_commands()
    checked = 0
    for where, argv in _commands(compose):
        if argv[0] != "bocompress":
            continue
        # `--help` of the very command (Typer exits 0 only for an existing (sub)command) ...
        res = runner.invoke(app, [*argv[1:], "--help"])
        assert res.exit_code == 0, f"{where}: `{' '.join(argv)} --help` failed: {res.output}"
        # ... and the full argument list parses (types, ranges, choices), without running it.
        path = tuple(a for a in argv[1:] if not a.startswith("-"))
        while path not in cmds:
            path = path[:-1]
        assert path, f"{where}: {argv} names no bocompress command"
        cmd = cmds[path]
        ctx = cmd.make_context(" ".join(["bocompress", *path]), list(argv[1 + len(path):]))
        assert ctx.params is not None
        checked += 1
    assert checked >= 5  # migrate, serve, worker in compose; serve, worker in the Dockerfiles


def test_commands_are_the_expected_ones(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    assert command_argv(svcs["migrate"]["command"]) == ["bocompress", "migrate"]
    serve = command_argv(svcs["service"]["command"])
    assert serve[:2] == ["bocompress", "serve"]
    params = cli_commands()[("serve",)].make_context("serve", serve[2:]).params
    assert params["host"] == "0.0.0.0" and params["port"] == 8000 and params["auth"] is True
    worker = command_argv(svcs["worker"]["command"])
    assert worker[:2] == ["bocompress", "worker"]
    assert cli_commands()[("worker",)].make_context("worker", worker[2:]).params["device"] == "cuda"


def test_known_env_is_derived_from_code() -> None:
    known = known_bocompress_env()
    # Sanity of the derivation itself (each source contributes what it must).
    assert "BOCOMPRESS_DATABASE_URL" in settings_env_names()
    assert {"BOCOMPRESS_URL", "BOCOMPRESS_TOKEN", "BOCOMPRESS_DATABASE_URL"} <= set(cli_envvars())
    from bocompress.worker.runtime import ALLOW_IMPORT_ENV

    assert ALLOW_IMPORT_ENV in env_reads_in_code()
    assert "BOCOMPRESS_NOT_A_SETTING" not in known


def test_compose_env_vars_are_known_settings(compose: dict[str, Any]) -> None:
    known = known_bocompress_env()
    seen = 0
    for name, svc in iter_bocompress_services(compose):
        for var in environment(svc):
            assert var.startswith("BOCOMPRESS_"), f"service {name!r} sets {var}, not a bocompress setting"
            assert var in known, f"service {name!r} sets {var}, which no code reads (known: {sorted(known)})"
            seen += 1
    assert seen >= 4


def test_dockerfile_env_vars_are_known(compose: dict[str, Any]) -> None:
    known = known_bocompress_env()
    for fname, df in dockerfiles().items():
        for var in df.env():
            if var.startswith("BOCOMPRESS_"):
                assert var in known, f"{fname} sets {var}, which no code reads"
            else:
                assert var.startswith(RUNTIME_ENV_PREFIXES), f"{fname} sets {var}: not a bocompress setting"


def test_serve_env_is_not_shadowed_by_cli_options(compose: dict[str, Any]) -> None:
    """A Settings variable for a field that `bocompress serve` always passes explicitly has no effect."""
    fields = settings_env_names()
    serve = cli_commands()[("serve",)]
    shadowed = {p.name for p in serve.params if p.name in fields.values() and not p.envvar}
    for name, svc in iter_bocompress_services(compose):
        argv = command_argv(svc.get("command") or [])
        if argv[:2] != ["bocompress", "serve"]:
            continue
        for var in environment(svc):
            field = fields.get(var)
            assert field not in shadowed, (
                f"service {name!r} sets {var}, but `bocompress serve` passes --{field.replace('_', '-')} "
                "explicitly, so the variable is ignored: use the option in the command")


def test_service_settings_validate(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's command + environment build a valid Settings: auth on, PostgreSQL, no auto-migrate."""
    from bocompress.service.config import Settings

    svc = compose["services"]["service"]
    for var in list(os.environ):
        if var.startswith("BOCOMPRESS_"):
            monkeypatch.delenv(var)
    for var, val in environment(svc).items():
        monkeypatch.setenv(var, val or "")
    argv = command_argv(svc["command"])
    params = cli_commands()[("serve",)].make_context("serve", argv[2:]).params
    s = Settings(host=params["host"], port=params["port"], auth=params["auth"], log_level=params["log_level"].value,
                 database_url=params["database_url"])
    assert s.auth and s.host == "0.0.0.0" and not s.is_sqlite and not s.migrate_on_start
    assert s.database_url.startswith("postgresql+psycopg://bocompress:")
    assert s.database_url.endswith("@postgres:5432/bocompress")
    # Auth off on 0.0.0.0 is refused: the compose file cannot be turned into an open service by env.
    with pytest.raises(ValueError, match="auth is off"):
        Settings(host="0.0.0.0", auth=False)


def test_worker_reserves_one_gpu_and_scales(compose: dict[str, Any]) -> None:
    w = compose["services"]["worker"]
    devices = w["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia" and dev["count"] == 1 and "gpu" in dev["capabilities"]
    # Scalable with `--scale worker=N`: nothing that names or binds one container.
    for key in ("container_name", "ports", "hostname"):
        assert key not in w, f"worker sets {key}: `docker compose up --scale worker=N` would fail"
    env = environment(w)
    assert env["BOCOMPRESS_URL"] == "http://service:8000"
    assert int(str(w.get("stop_grace_period", "10s")).rstrip("s")) >= 25  # > the worker's 20 s grace


def test_start_order(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    assert svcs["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svcs["migrate"]["restart"] == "no"
    assert svcs["service"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert svcs["worker"]["depends_on"]["service"]["condition"] == "service_healthy"
    pg = svcs["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    volume = pg["volumes"][0].split(":")[0]
    assert volume in (compose.get("volumes") or {}), "postgres data must be a named volume"


def test_service_healthcheck_hits_healthz_on_its_port(compose: dict[str, Any]) -> None:
    svc = compose["services"]["service"]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "bocompress-healthcheck"
    params = cli_commands()[("serve",)].make_context("serve", command_argv(svc["command"])[2:]).params
    assert test[2] == f"http://127.0.0.1:{params['port']}/healthz"
    published = [p for p in svc["ports"] if str(p).endswith(f":{params['port']}")]
    assert published, "the service port is published"


def test_no_secret_in_the_files(raw_compose: dict[str, Any]) -> None:
    for name, svc in raw_compose["services"].items():
        for var, val in environment(svc).items():
            if any(w in var for w in ("PASSWORD", "TOKEN", "SECRET")):
                assert val is not None and val.startswith("${") and val.endswith("}"), (
                    f"service {name!r}: {var} must come from .env by interpolation, not be written here")
    assert "bct_" not in COMPOSE_FILE.read_text()
    # The database password is required: compose refuses to start without it.
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        load_compose({})
    url = environment(raw_compose["services"]["service"])["BOCOMPRESS_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:?" in str(url)


def test_interpolation_rules() -> None:
    env = {"A": "1", "E": ""}
    assert interpolate("${A:-x}/${B:-x}/${E:-x}/${E-x}/$$A/$A", env) == "1/x/x//$A/1"
    assert interpolate("${E:+y}${A:+y}", env) == "y"
    with pytest.raises(MissingVariable, match="need E"):
        interpolate("${E:?need E}", env)


# ----------------------------------------------------------------------------------- Dockerfiles


def test_dockerfiles_exist_and_compose_builds_them(raw_compose: dict[str, Any]) -> None:
    files = dockerfiles()
    assert set(files) >= {"Dockerfile.service", "Dockerfile.worker"}
    used = {svc["build"]["dockerfile"] for svc in raw_compose["services"].values() if "build" in svc}
    assert used == {"docker/Dockerfile.service", "docker/Dockerfile.worker"}
    for svc in raw_compose["services"].values():
        if "build" in svc:
            assert svc["build"]["context"] == "."


def _run_lines(df: Any) -> list[str]:
    return [i.args for i in df.all("RUN")]


def test_torch_builds() -> None:
    files = dockerfiles()
    for fname, df in files.items():
        froms = df.all("FROM")
        assert froms and froms[0].args.startswith("python:3.11-slim"), f"{fname}: base image"
        runs = _run_lines(df)
        torch_i = next(i for i, r in enumerate(runs) if "pip install torch==2.13.0" in r)
        project_i = next(i for i, r in enumerate(runs) if "pip install --no-deps ." in r)
        assert torch_i < project_i, f"{fname}: torch must be installed before the project"
        # Everything after torch is installed under a constraint that keeps that torch.
        for r in runs[torch_i + 1:]:
            if "pip install" in r:
                assert "-c /etc/pip-constraints.txt" in r, f"{fname}: unconstrained pip install: {r}"
    service_torch = next(r for r in _run_lines(files["Dockerfile.service"]) if "torch==2.13.0" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in service_torch
    worker_torch = next(r for r in _run_lines(files["Dockerfile.worker"]) if "torch==2.13.0" in r)
    assert "--index-url" not in worker_torch, "the worker takes the CUDA build from the default index"


def test_non_root_and_healthchecks() -> None:
    for fname, df in dockerfiles().items():
        user = df.last("USER")
        assert user is not None and user.args not in ("root", "0"), f"{fname}: runs as root"
        cmd = df.last("CMD")
        assert cmd is not None and user.line < cmd.line
        hc = df.exec_form("HEALTHCHECK")
        assert hc and hc[0] == "bocompress-healthcheck", f"{fname}: no health check"
        copies = " ".join(i.args for i in df.all("COPY"))
        assert "docker/healthcheck.py /usr/local/bin/bocompress-healthcheck" in copies


def test_copies_exist_are_not_dockerignored_and_cover_the_packages() -> None:
    import tomllib

    patterns = dockerignore_patterns()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*").rstrip(".") for p in includes}
    for fname, df in dockerfiles().items():
        sources = df.copy_sources()
        for src in sources:
            assert (ROOT / src).exists(), f"{fname}: COPY {src}: no such file in the repository"
            assert not is_dockerignored(src, patterns), f"{fname}: COPY {src}, but .dockerignore excludes it"
        assert packages <= set(sources), f"{fname}: packages {packages - set(sources)} are not copied"
        assert {"pyproject.toml", "README.md"} <= set(sources)


def test_dockerignore_keeps_secrets_and_junk_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".env", ".venv/bin/python", ".git/config", "bocompress.db", "service/__pycache__/app.cpython-311.pyc",
                 "tests/conftest.py"):
        assert is_dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    for path in ("bocompress/cli.py", "migrations/env.py", "worker/zoo/weights/digits-cnn.safetensors",
                 "docker/healthcheck.py"):
        assert not is_dockerignored(path, patterns), f"{path} is needed by the images"


def test_worker_image_entrypoint() -> None:
    df = dockerfiles()["Dockerfile.worker"]
    assert df.exec_form("ENTRYPOINT") == ["bocompress-worker-entrypoint"]
    copies = " ".join(i.args for i in df.all("COPY"))
    assert "docker/worker-entrypoint.sh /usr/local/bin/bocompress-worker-entrypoint" in copies


# ----------------------------------------------------------------------------------- scripts


def _entrypoint(args: list[str], token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOCOMPRESS_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if token is not None:
        env["BOCOMPRESS_TOKEN"] = token
    return subprocess.run(["sh", str(DOCKER_DIR / "worker-entrypoint.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_worker_entrypoint_refuses_an_empty_token() -> None:
    res = _entrypoint(["bocompress", "worker", "--device", "cuda"], token="")
    assert res.returncode == 2
    assert "BOCOMPRESS_TOKEN is empty" in res.stderr and "token create --role worker" in res.stderr


def test_worker_entrypoint_execs_the_command() -> None:
    res = _entrypoint(["bocompress", "worker", "--help"], token="bct_x")
    assert res.returncode == 0, res.stderr
    assert "--device" in res.stdout
    # An explicit --token is enough; other commands pass through untouched.
    res = _entrypoint(["bocompress", "worker", "--token", "bct_x", "--help"], token=None)
    assert res.returncode == 0, res.stderr
    res = _entrypoint(["bocompress", "migrate", "--help"], token=None)
    assert res.returncode == 0, res.stderr


def test_healthcheck_script_fails_when_unreachable() -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BOCOMPRESS_URL": f"http://127.0.0.1:{port}"}
    res = subprocess.run([sys.executable, str(DOCKER_DIR / "healthcheck.py")], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1
    assert f"127.0.0.1:{port}/healthz: unreachable" in res.stderr


def test_wheel_the_images_install_carries_migrations(tmp_path: Path) -> None:
    """`pip install .` (what the Dockerfiles run) ships migrations and weights; `migrate` works from it."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("bocompress-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert "migrations/env.py" in names
    assert any(n.startswith("migrations/versions/") and n.endswith(".py") and "__init__" not in n for n in names)
    assert "worker/zoo/weights/digits-cnn.safetensors" in names
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    db = tmp_path / "wheel.db"
    res = subprocess.run(
        [sys.executable, "-c",
         "import bocompress.cli, bocompress.service.db.migrate as m, sys; print(m.MIGRATIONS_DIR); "
         "sys.argv = ['bocompress', 'migrate', '--database-url', sys.argv[1]]; bocompress.cli.main()",
         f"sqlite:///{db}"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert str(tmp_path / "site" / "migrations") in res.stdout, "migrations must be found inside the installed wheel"
    assert "database at revision" in res.stdout
