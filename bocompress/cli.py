"""The ``bocompress`` command line (Typer).

Commands: ``serve`` (the service), ``worker`` (a GPU/CPU worker), ``demo`` (everything on one
machine), ``migrate`` (database schema), ``token create|revoke``, and the client-side ``submit``,
``status`` and ``trials``. Heavy modules (the service, the worker, torch, pandas, PyYAML) are
imported inside the command that needs them, so ``bocompress --help`` is instant.

Every error a user can cause prints one line, ``error: <message>``, on stderr and exits with a
non-zero status (2 for wrong arguments, 1 for everything else); no traceback.
"""

from __future__ import annotations

import itertools
import os
from enum import Enum
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors its own copy of click as typer._click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as _cx  # type: ignore[no-redef]

from .cli_support import best_value, expand_specs, fmt_counts, fmt_pipeline, table, validate_specs
from .errors import BocompressError

DEFAULT_DATABASE_URL = "sqlite:///./bocompress.db"
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_validate = validate_specs  # its name before bocompress/cli_support.py (tests/reliability import it)


class LogLevel(str, Enum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


class Role(str, Enum):
    admin = "admin"
    client = "client"
    worker = "worker"


class _OneLineErrors(TyperGroup):
    """The root group: usage mistakes and client errors become ``error: ...`` on one line."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except typer.Abort:
            _fail("aborted", 130)
        except _cx.NoArgsIsHelpError as exc:  # a bare group: show its help
            typer.echo(exc.ctx.get_help())
            sys.exit(2)
        except _cx.ClickException as exc:
            message = exc.format_message().replace("Value error, ", "")
            if isinstance(exc, _cx.UsageError) and exc.ctx is not None:
                message = f"{message} (see '{exc.ctx.command_path} --help')"
            _fail(message, exc.exit_code)
        except BocompressError as exc:
            _fail(str(exc), 1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, code: int) -> None:
    """Print ``error: <message>`` (one line) to stderr and exit with ``code``."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


app = typer.Typer(
    cls=_OneLineErrors,
    name="bocompress",
    help=(
        "bocompress: Bayesian optimization of per-layer neural network compression.\n\n"
        "\b\nExample:\n"
        "  bocompress demo --trials 24\n"
        "  bocompress serve --port 8000 &\n"
        "  bocompress worker --device cuda:0 &\n"
        "  bocompress submit job.yaml --wait"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)
token_app = typer.Typer(
    help=(
        "Create or revoke API tokens (run on the service host; talks to the database).\n\n"
        "\b\nExample:\n"
        "  bocompress token create --role client --owner alice\n"
        "  bocompress token revoke 3"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(token_app, name="token")

_URL = typer.Option(None, "--url", envvar="BOCOMPRESS_URL", help="Service URL [default: http://127.0.0.1:8000].")
_TOKEN = typer.Option(None, "--token", envvar="BOCOMPRESS_TOKEN", help="API token (Bearer).", show_envvar=True)
_DB = typer.Option(DEFAULT_DATABASE_URL, "--database-url", envvar="BOCOMPRESS_DATABASE_URL",
                   help="SQLAlchemy database URL (sqlite:///... or postgresql+psycopg://...).")


def _lazy(module: str, attr: str) -> Any:
    """Import ``module.attr`` at call time; a missing piece is a one-line error."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        extra = "worker" if module.startswith("bocompress.worker") else "service"
        raise BocompressError(f"cannot import {module}: {exc}; this command needs the {extra} extra: "
                              f"pip install 'bocompress[{extra}]'") from exc
    try:
        return getattr(mod, attr)
    except AttributeError as exc:
        raise BocompressError(f"{module} has no {attr!r}") from exc


def _client(url: str | None, token: str | None) -> Any:
    from .client import Client

    return Client(url=url, token=token)


# --------------------------------------------------------------------------- server side


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", envvar="BOCOMPRESS_HOST", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535, envvar="BOCOMPRESS_PORT", help="TCP port."),
    database_url: str = _DB,
    auth: bool = typer.Option(True, "--auth/--no-auth", envvar="BOCOMPRESS_AUTH",
                              help="Require Bearer tokens (--no-auth: local use only)."),
    log_level: LogLevel = typer.Option(LogLevel.warning, envvar="BOCOMPRESS_LOG_LEVEL",
                                       help="Log level (JSON lines on stderr; quiet by default)."),
    processes: int = typer.Option(1, min=1, max=64, envvar="BOCOMPRESS_PROCESSES",
                                  help="Server processes on this port (replicas; more requests/s per host)."),
) -> None:
    """Run the service: REST API, dashboard and BO engine.

    \b
    Example:
      bocompress serve --host 0.0.0.0 --port 8000 --database-url postgresql+psycopg://bo:bo@db/bo
      bocompress serve --no-auth          # local, SQLite in ./bocompress.db
      bocompress serve --processes 4 --database-url postgresql://...   # 4 server processes
    """
    _lazy("bocompress.service.app", "serve")(host=host, port=port, database_url=database_url, auth=auth,
                                     log_level=log_level.value, processes=processes)


@app.command()
def worker(
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda or cuda:N."),
    name: Optional[str] = typer.Option(None, help="Worker name shown on its trials [default: host:pid]."),
    max_trials: Optional[int] = typer.Option(None, min=1, help="Exit after this many tasks [default: run forever]."),
    poll: float = typer.Option(1.0, min=0.05, help="Seconds between lease requests when idle."),
    allow_import: Optional[str] = typer.Option(
        None, "--allow-import",
        help="Comma-separated import prefixes user models may be built from, e.g. timm,transformers,mypkg "
             "[default: env BOCOMPRESS_WORKER_ALLOW_IMPORT; none].",
    ),
) -> None:
    """Run a worker: lease trials from the service, compress, measure, report.

    \b
    Example:
      bocompress worker --url http://gpu-box:8000 --token $TOKEN --device cuda:0
      BOCOMPRESS_URL=http://127.0.0.1:8000 bocompress worker --device cpu --max-trials 10
      bocompress worker --allow-import timm,transformers,mypkg
    """
    if not _DEVICE_RE.match(device):
        raise typer.BadParameter(f"{device!r} is not cpu, cuda or cuda:N", param_hint="'--device'")
    prefixes = None
    if allow_import is not None:
        prefixes = [p.strip() for p in allow_import.split(",") if p.strip()]
        bad = [p for p in prefixes if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*[:.]?$", p)]
        if bad:
            raise typer.BadParameter(f"{bad[0]!r} is not a module prefix such as 'mypkg' or 'timm'",
                                     param_hint="'--allow-import'")
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    run_worker = _lazy("bocompress.worker.loop", "run_worker")
    run_worker(url=url, token=token, device=device, name=name, max_trials=max_trials, poll=poll,
               allowed_prefixes=prefixes)


@app.command()
def demo(
    trials: int = typer.Option(24, min=1, help="Trials of the demo job."),
    workers: int = typer.Option(1, min=1, max=64, help="Local worker processes."),
    keep: bool = typer.Option(False, "--keep", help="Keep the service running (and its database) afterwards."),
) -> None:
    """Run everything on this machine: a service, workers and a small compression job.

    \b
    Example:
      bocompress demo --trials 24 --workers 2
    """
    _lazy("bocompress.demo", "run_demo")(trials=trials, workers=workers, keep=keep)


@app.command()
def migrate(database_url: str = _DB) -> None:
    """Create or upgrade the database schema (Alembic) to the latest version.

    \b
    Example:
      bocompress migrate --database-url postgresql+psycopg://bo:bo@localhost/bo
    """
    upgrade = _lazy("bocompress.service.db.migrate", "upgrade")
    try:
        revision = upgrade(database_url)
    except Exception as exc:  # a database that cannot be opened: one line and exit code 2, as `serve`
        message = _lazy("bocompress.service.db.migrate", "explain_startup_error")(exc, database_url)
        if message is None:
            raise
        _fail(message, 2)
    typer.echo(f"database at revision {revision}" if revision else "database upgraded")


@token_app.command("create")
def token_create(
    role: Role = typer.Option(..., help="Token role."),
    owner: Optional[str] = typer.Option(None, help="Owner name (jobs created with it belong to them)."),
    name: Optional[str] = typer.Option(None, help="A label to recognise the token by."),
    database_url: str = _DB,
) -> None:
    """Create a token and print its secret (shown only this once).

    \b
    Example:
      bocompress token create --role client --owner alice --name laptop
      export BOCOMPRESS_TOKEN=$(bocompress token create --role worker --owner ops)
    """
    create_token = _lazy("bocompress.service.auth", "create_token")
    try:
        secret = create_token(database_url, role.value, owner, name)
    except ValueError as exc:
        raise BocompressError(str(exc)) from exc
    typer.echo(secret)


@token_app.command("revoke")
def token_revoke(
    token_id: int = typer.Argument(..., help="Id of the token to revoke."),
    database_url: str = _DB,
) -> None:
    """Revoke a token; requests with it are refused from now on.

    \b
    Example:
      bocompress token revoke 3 --database-url sqlite:///./bocompress.db
    """
    revoke_token = _lazy("bocompress.service.auth", "revoke_token")
    try:
        revoke_token(database_url, token_id)
    except (ValueError, LookupError) as exc:
        raise BocompressError(str(exc)) from exc
    typer.echo(f"revoked token {token_id}")


# --------------------------------------------------------------------------- client side


@app.command()
def submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="YAML job file."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the jobs (a pipeline: every stage) to finish, "
                              "with a progress bar."),
    poll: float = typer.Option(1.0, min=0.001, help="Seconds between polls with --wait."),
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
) -> None:
    """Submit the job(s) of a YAML file; prints one line per job: id and name.

    The file holds one job spec, or `jobs: [...]`; an optional `sweep` maps dotted keys to value
    lists and expands each spec into one job per combination. A spec with
    `recipe: {kind: two-pass}` is a pipeline (convs, fine-tune, linear layers): --wait waits for
    every stage and prints the last job with the total R.

    \b
    Example:
      bocompress submit job.yaml --wait
    \b
    with job.yaml:
      name: digits-svd
      compression: {model: digits_cnn, data: digits, method: svd}
      objective: {kind: scalarized, kappa: 1.0}
      budget: {max_trials: 30, max_parallel: 2}
      sweep: {objective.kappa: [0.5, 1, 2]}
    """
    import yaml

    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise BocompressError(f"{file}: not valid YAML: {exc}") from exc
    specs = expand_specs(document)
    validate_specs(specs)
    with _client(url, token) as client:
        jobs = client.submit_many(specs)
        for job in jobs:
            typer.echo(f"{job.id}\t{job.name}")
        if wait:
            for job in jobs:
                job.wait(progress=True, poll=poll)
                if job.pipeline:  # a recipe: wait for every stage; the last job holds the final model
                    try:
                        job = job.wait_pipeline(progress=True, poll=poll)
                    except BocompressError as exc:
                        typer.echo(f"{job.id}\t{job.name}\tpipeline {exc}")
                        continue
                best = job.best(refresh=False)
                value = (best or {}).get("values", {}).get(job.metric)
                tail = f"\tpipeline {fmt_pipeline(job.pipeline)}" if job.pipeline else ""
                typer.echo(f"{job.id}\t{job.name}\t{job.state}\tbest {job.metric}={value}{tail}")



@app.command()
def status(
    job_id: Optional[int] = typer.Argument(None, help="A job id; without it, list jobs."),
    limit: int = typer.Option(50, min=1, help="Most jobs to list."),
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
) -> None:
    """Show jobs (a table), or one job's state, trial counts and best trial; for a pipeline's job
    (a spec's `recipe`) its stage, pass and jobs (and the total R once done).

    \b
    Example:
      bocompress status
      bocompress status 7
    """
    with _client(url, token) as client:
        if job_id is None:
            rows, pipes = [], []
            for job in itertools.islice(client.jobs(limit=min(limit, 100)), limit):
                rows.append([str(job["id"]), job.get("name", ""), job.get("state", ""), job.get("kind", ""),
                             fmt_counts(job.get("counts") or {}),
                             best_value(job) + (" COLLAPSED" if job.get("collapsed") else ""),
                             str(job.get("created_at", ""))[:19]])
                p = job.get("pipeline") or {}
                pipes.append(f"{p['stage']} (pass {p['pass']})" if p else "")
            header = ["id", "name", "state", "kind", "trials", "best", "created"]
            if any(pipes):  # a pipeline column only when some job belongs to one
                header.append("pipeline")
                rows = [[*r, p] for r, p in zip(rows, pipes)]
            typer.echo(table(rows, header) if rows else "no jobs")
            return
        job = client.get_job(job_id)
        data = job.data
        lines = [f"job {job.id}: {job.name}", f"state: {job.state}", f"kind: {job.kind}"]
        if data.get("reason"):
            lines.append(f"reason: {data['reason']}")
        if job.pipeline:
            lines.append(f"pipeline: {fmt_pipeline(job.pipeline)}")
        lines.append(f"trials: {fmt_counts(job.counts) or 'none'} (max {job.max_trials})")
        best = data.get("best")  # not job.best(): its CollapseWarning would repeat the WARNING lines below
        if best:
            values = ", ".join(f"{k}={v:.4g}" for k, v in (best.get("values") or {}).items())
            lines.append(f"best: trial {best['id']} (#{best.get('number')}): {values}")
            params = ", ".join(f"{k}={v:.3g}" for k, v in (best.get("params") or {}).items())
            lines.append(f"  params: {params}")
        else:
            lines.append("best: none yet")
        for w in data.get("warnings") or []:
            lines.append(f"WARNING: {w}")
        typer.echo("\n".join(lines))


@app.command()
def trials(
    job_id: int = typer.Argument(..., help="The job id."),
    csv: bool = typer.Option(False, "--csv", help="Write CSV instead of a table."),
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
) -> None:
    """Print a job's trials: one row per trial, parameters and metrics as columns.

    \b
    Example:
      bocompress trials 7
      bocompress trials 7 --csv > trials.csv
    """
    with _client(url, token) as client:
        df = client.get_job(job_id).trials()
    if csv:
        df.to_csv(sys.stdout, index=False)
    elif df.empty:
        typer.echo("no trials")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            typer.echo(df.to_string(index=False))


def main() -> None:  # pragma: no cover - `python -m bocompress.cli`
    """Entry point equivalent to the ``bocompress`` script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
