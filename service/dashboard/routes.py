"""Dashboard routes: page shells, sign-in/out with the read-only cookie, CSV export, static files.

The pages (``/``, ``/jobs/{id}``) are shells: they hold no job data, only the signed-in
identity for the header, and their scripts read the JSON API. The browser authenticates to the
API with the ``bocompress_token`` cookie set by ``POST /login``; the API accepts that cookie for
``GET``/``HEAD`` only, so a cross-site request can never change anything. Cancelling a job (a
``POST``) therefore needs a bearer token: the job page asks for one when auth is on (see
``static/job.js``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import BigInteger, Text, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from bocompress.service.api.deps import ClientDep, Context, CtxDep, viewer
from bocompress.service.api.serialize import iso, job_out, job_warnings, trial_out
from bocompress.service.auth import LOCAL_ADMIN, Principal
from bocompress.service.db.models import Trial
from bocompress.service.db.session import read_session
from bocompress.service.db.queries import best_trial, visible_job

COOKIE = "bocompress_token"
HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"

# No inline script or style anywhere: the pages run only the scripts served from /static.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


# --------------------------------------------------------------------------- static files


@dataclass(frozen=True)
class Asset:
    """A static file held in memory: its bytes, media type and content hash (the ETag)."""

    body: bytes
    media_type: str
    digest: str


@lru_cache(maxsize=1)
def assets() -> dict[str, Asset]:
    """Every regular file directly in ``static/``, by name (read once, on first use).

    Lookups go through this table only, so no request path can reach outside the folder.
    """
    out: dict[str, Asset] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media.startswith("text/") or media in ("application/javascript", "image/svg+xml"):
            media += "; charset=utf-8"
        out[path.name] = Asset(body, media, hashlib.sha256(body).hexdigest()[:16])
    return out


def static_url(name: str) -> str:
    """The URL of a static file, versioned by its content so browsers may cache it for good.

    Raises:
        KeyError: no such file in ``static/`` (a template bug, caught by the tests).
    """
    return f"/static/{name}?v={assets()[name].digest}"


@router.get("/static/{name}")
def static_file(name: str, request: Request, v: str | None = None) -> Response:
    """A vendored or hand-written asset; 404 for anything not in the table (no traversal)."""
    asset = assets().get(name)
    if asset is None:
        return Response(b"not found", status_code=404, media_type="text/plain")
    etag = f'"{asset.digest}"'
    cache = "public, max-age=31536000, immutable" if v == asset.digest else "no-cache"
    headers = {"ETag": etag, "Cache-Control": cache, "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


# --------------------------------------------------------------------------- identity


def page_principal(request: Request, ctx: Context) -> Principal | None:
    """Who the browser is: the local admin when auth is off, else the cookie's token (or None)."""
    if not ctx.settings.auth:
        return LOCAL_ADMIN
    secret = request.cookies.get(COOKIE)
    if not secret:
        return None
    return ctx.principal_for(secret)


def safe_next(target: str | None) -> str:
    """A local path to return to after sign-in; anything else (another site, ``//host``) becomes ``/``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def same_origin(request: Request) -> bool:
    """False when a browser says the form was posted from another origin (login CSRF)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


@lru_cache(maxsize=1)
def templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(TEMPLATES_DIR))
    t.env.globals["static_url"] = static_url
    return t


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    ctx: Context = request.app.state.ctx
    base = {"auth": ctx.settings.auth, "who": context.pop("who", None)}
    resp = templates().TemplateResponse(request, name, {**base, **context}, status_code=status)
    resp.headers.update(PAGE_HEADERS)
    return resp


def to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)


# --------------------------------------------------------------------------- pages


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, ctx: CtxDep) -> Response:
    """The jobs list (a shell; ``static/jobs.js`` fills it from ``GET /api/v1/jobs``)."""
    who = page_principal(request, ctx)
    if who is None:
        return to_login(request)
    return render(request, "jobs.html", who=who, page="jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request, ctx: CtxDep) -> Response:
    """One job (a shell; ``static/job.js`` reads the job and polls its trials)."""
    who = page_principal(request, ctx)
    if who is None:
        return to_login(request)
    return render(request, "job.html", who=who, page="job", job_id=job_id)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, ctx: CtxDep, next: str | None = None) -> Response:  # noqa: A002
    """The sign-in form (or a note that auth is off)."""
    return render(request, "login.html", who=page_principal(request, ctx), page="login", next=safe_next(next),
                  error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, ctx: CtxDep, token: Annotated[str, Form(max_length=500)] = "",
          next: Annotated[str, Form(max_length=2000)] = "/") -> Response:  # noqa: A002
    """Check the token and store it in an HttpOnly, SameSite=Strict cookie (read access for the API)."""
    target = safe_next(next)
    if not ctx.settings.auth:
        return RedirectResponse(target, status_code=303)
    if not same_origin(request):
        return render(request, "login.html", status=403, page="login", next=target,
                      error="This form was posted from another site; sign in from this page.")
    secret = token.strip()
    p = ctx.principal_for(secret) if secret else None
    if p is None:
        return render(request, "login.html", status=401, page="login", next=target,
                      error="That token is not valid (mistyped, or revoked)." if secret else "Enter a token.")
    if p.role == "worker":
        return render(request, "login.html", status=403, page="login", next=target,
                      error="A worker token cannot read jobs: sign in with a client or admin token.")
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/",
                    secure=request.url.scheme == "https")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@router.post("/logout")
def logout(request: Request) -> Response:
    """Forget the cookie and go back to the sign-in page."""
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


# --------------------------------------------------------------------------- the job page's first read

SCALAR_COLUMNS = ("id", "seq", "number", "state", "attempt", "worker", "error")
TIME_COLUMNS = ("created_at", "started_at", "finished_at")
JSON_COLUMNS = ("params", "values", "sem")


def epoch_ms(column: Any, dialect: str) -> ColumnElement[Any]:
    """A UTC timestamp column as integer milliseconds since 1970, computed by the database.

    Cheaper than building 30,000 datetime objects in Python for a 10,000-trial job, and
    shorter on the wire than ISO strings.
    """
    if dialect == "sqlite":   # stored as naive UTC text; julianday() parses it
        ms = (func.julianday(column) - 2440587.5) * 86400000.0
    else:
        ms = func.extract("epoch", column) * 1000.0
    return cast(func.round(ms), BigInteger)


@router.get("/jobs/{job_id}/snapshot.json")
def snapshot(job_id: int, ctx: CtxDep, p: ClientDep, trials: bool = True) -> Response:
    """The job and (with ``trials``) its whole trial history, in columns, for the job page's first render.

    The same visibility as ``GET /api/v1/jobs/{id}`` (404 for another owner's job), but lean:
    the job comes without ``best`` (the page computes it from the trials; the API's costs a
    full scan of completed trials), the trials' JSON columns are passed through as stored, not
    decoded and re-encoded, and times are epoch milliseconds, so a 10,000-trial job is read in
    a fraction of a second. ``seq`` is the job's change counter read before the trials (as the
    API's ``X-Job-Seq``): the page then polls ``GET /api/v1/jobs/{id}/trials?since=<seq>``.

    Returns:
        ``{"job": {...}, "seq": n, "trials": {"n": k, "id": [k], "seq": [k], ..., "params": [k]}}``:
        one list of length k per trial field, in ``seq`` order; ``created_at``, ``started_at`` and
        ``finished_at`` in ms since the epoch (or null). No ``trials`` when ``trials=false``.
    """
    with read_session(ctx.factory) as s:
        job = visible_job(s, job_id, viewer(p))
        meta = job_out(s, job, with_best=False)
        # the service's warnings about the best trial (a collapsed model must never look like a result)
        best = best_trial(s, job) if job.kind == "compression" else None
        meta["warnings"], meta["collapsed"] = job_warnings(job.kind, job.spec or {}, job.profile or {},
                                                           trial_out(best) if best else None)
        head = '{"job":' + json.dumps(meta, separators=(",", ":")) + ',"seq":' + str(int(job.seq))
        if not trials:
            return Response(head + "}", media_type="application/json", headers={"Cache-Control": "no-store"})
        cols: list[Any] = [getattr(Trial, c) for c in SCALAR_COLUMNS]
        cols += [epoch_ms(getattr(Trial, c), ctx.dialect) for c in TIME_COLUMNS]
        cols += [cast(getattr(Trial, c), Text) for c in JSON_COLUMNS]
        q = select(*cols).where(Trial.job_id == job_id, Trial.kind == "evaluate").order_by(Trial.seq)
        rows = s.execute(q).all()
    by_col = list(zip(*rows)) if rows else [()] * len(cols)
    parts = [head, ',"trials":{"n":', str(len(rows))]
    for i, name in enumerate(SCALAR_COLUMNS + TIME_COLUMNS):
        parts += [f',"{name}":', json.dumps(list(by_col[i]), separators=(",", ":"))]
    for i, name in enumerate(JSON_COLUMNS, start=len(SCALAR_COLUMNS) + len(TIME_COLUMNS)):
        # Stored JSON text, as written by the service's own serializer: spliced in as is.
        parts += [f',"{name}":[', ",".join(v if v else "null" for v in by_col[i]), "]"]
    parts.append("}}")
    return Response("".join(parts), media_type="application/json", headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- CSV export

FIRST_VALUES = ("objective", "distill_l2", "ratio")
TRIAL_COLUMNS = ("number", "id", "state", "seq", "attempt", "worker", "created_at", "started_at", "finished_at")


#: A text cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: Any) -> Any:
    """``v`` safe for a spreadsheet: text that a spreadsheet would run as a formula gets a leading
    ``'`` (OWASP's advice); numbers (a negative value included) are left as they are."""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def content_disposition(filename: str) -> str:
    """An ``attachment`` header per RFC 6266: an ASCII ``filename`` fallback and the exact name as
    ``filename*=UTF-8''...`` (RFC 8187), so any job name is sent as valid Latin-1 header bytes."""
    from urllib.parse import quote

    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def trials_csv(rows: list[Any], param_names: list[str]) -> Iterator[str]:
    """The trials as CSV lines: fixed columns, then every value, its standard error, θ, and the error.

    Args:
        rows: trial rows (id, number, seq, state, params, values, sem, attempt, worker, times, error).
        param_names: the search space's parameter names, in order (extra names found in rows follow).

    Yields:
        CSV text, one chunk per row.
    """
    value_keys: set[str] = set()
    sem_keys: set[str] = set()
    names = list(param_names)
    seen = set(names)
    for r in rows:
        value_keys.update((r.values or {}).keys())
        sem_keys.update((r.sem or {}).keys())
        for k in r.params or {}:
            if k not in seen:
                seen.add(k)
                names.append(k)
    vals = [k for k in FIRST_VALUES if k in value_keys] + sorted(value_keys - set(FIRST_VALUES))
    sems = sorted(sem_keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")  # RFC 4180; and a CR inside a cell is quoted then

    def flush() -> str:
        out = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return out

    w.writerow([csv_cell(c) for c in (*TRIAL_COLUMNS, *vals, *(f"sem.{k}" for k in sems),
                                        *(f"param.{k}" for k in names), "error")])
    yield flush()
    for r in rows:
        v, s, p = r.values or {}, r.sem or {}, r.params or {}
        w.writerow([csv_cell(c) for c in (
            r.number, r.id, r.state, r.seq, r.attempt, r.worker or "", iso(r.created_at) or "",
            iso(r.started_at) or "", iso(r.finished_at) or "", *(v.get(k, "") for k in vals),
            *(s.get(k, "") for k in sems), *(p.get(k, "") for k in names), r.error or "")])
        yield flush()


@router.get("/jobs/{job_id}/trials.csv")
def export_csv(job_id: int, ctx: CtxDep, p: ClientDep) -> Response:
    """Every trial of the job as CSV (same auth as the API: bearer, or the cookie for this GET)."""
    with read_session(ctx.factory) as s:
        job = visible_job(s, job_id, viewer(p))
        rows = s.execute(
            select(Trial.id, Trial.number, Trial.seq, Trial.state, Trial.params, Trial.values, Trial.sem,
                   Trial.attempt, Trial.worker, Trial.created_at, Trial.started_at, Trial.finished_at, Trial.error)
            .where(Trial.job_id == job_id, Trial.kind == "evaluate").order_by(Trial.number)
        ).all()
        names = [str(sp["name"]) for sp in job.search_space or []]
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.name)[:60] or "job"
    return StreamingResponse(
        trials_csv(list(rows), names), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": content_disposition(f"job-{job_id}-{slug}-trials.csv"),
                 "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )
