"""Bearer tokens with roles, stored hashed; and the CLI helpers that mint and revoke them."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update

from bocompress.service.db.models import Token, utcnow
from bocompress.service.db.session import make_engine, make_sessionmaker, run_tx

ROLES = ("admin", "client", "worker")
TOKEN_PREFIX = "bct_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and the owner name jobs are filed under."""

    role: str
    owner: str
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


LOCAL_ADMIN = Principal(role="admin", owner="local")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def issue(session, role: str, owner: str | None, name: str | None) -> tuple[Token, str]:  # type: ignore[no-untyped-def]
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    secret = new_secret()
    tok = Token(role=role, owner=owner or (role if role != "client" else "client"), name=name,
                secret_hash=hash_secret(secret), created_at=utcnow())
    session.add(tok)
    session.flush()
    return tok, secret


def lookup(session, secret: str) -> Principal | None:  # type: ignore[no-untyped-def]
    tok = session.execute(
        select(Token).where(Token.secret_hash == hash_secret(secret), Token.revoked_at.is_(None))
    ).scalars().first()
    if tok is None:
        return None
    return Principal(role=tok.role, owner=tok.owner, token_id=tok.id)


def revoke(session, token_id: int) -> bool:  # type: ignore[no-untyped-def]
    res = session.execute(
        update(Token).where(Token.id == token_id, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return res.rowcount == 1


def create_token(database_url: str, role: str, owner: str | None = None, name: str | None = None) -> str:
    """Mint a token directly in the database (``bocompress token create``); returns the secret."""
    from bocompress.service.db.migrate import check_schema, ensure_schema

    if database_url.startswith("sqlite"):
        ensure_schema(database_url)
    engine = make_engine(database_url)
    try:
        check_schema(engine, database_url)
        factory = make_sessionmaker(engine)
        return run_tx(factory, lambda s: issue(s, role, owner, name)[1])
    finally:
        engine.dispose()


def revoke_token(database_url: str, token_id: int) -> bool:
    engine = make_engine(database_url)
    try:
        return run_tx(make_sessionmaker(engine), lambda s: revoke(s, token_id))
    finally:
        engine.dispose()
