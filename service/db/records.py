"""Rows outside a trial's state machine: uploads (models, datasets), tokens, the health check.

:class:`RecordsMixin` implements these parts of :class:`~bocompress.service.db.store.Store` for the SQL
backends, one transaction in the thread pool each (``_tx``, ``_read`` of
:class:`~bocompress.service.db.sql_store.OrmStore`), and answers with the API's views of the rows.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from bocompress.service.auth import Principal, issue, lookup, revoke
from bocompress.service.db.errors import NotFound
from bocompress.service.db.models import Blob, Token, new_blob
from bocompress.service.db.session import read_session, run_tx
from bocompress.service.db.views import iso

#: An upload's answer lists at most this many tensors (name -> shape); ``n_tensors`` counts them all.
SUMMARY_TENSORS = 100


def blob_out(b: Blob) -> dict[str, Any]:
    """An upload as the API shows it: a summary of its header, never the whole of it."""
    tensors = b.tensors or {}
    shown = {k: tensors[k]["shape"] for k in sorted(tensors)[:SUMMARY_TENSORS]}
    out = {"id": b.id, "kind": b.kind, "arch": b.arch, "size": b.size, "sha256": b.sha256,
           "created_at": iso(b.created_at), "tensors": shown, "n_tensors": len(tensors),
           "tensors_truncated": len(tensors) > len(shown)}
    if b.meta and b.meta.get("arch_spec"):
        out["arch_spec"] = b.meta["arch_spec"]
    return out


def token_out(t: Token, secret: str | None = None) -> dict[str, Any]:
    """A token as the API shows it; ``secret`` only in the answer that minted it."""
    return {"id": t.id, "role": t.role, "owner": t.owner, "name": t.name, "created_at": iso(t.created_at),
            "revoked_at": iso(t.revoked_at), "token": secret}


def _visible_blob(s: Session, blob_id: str, kind: str, viewer: Any) -> Blob:
    b = s.get(Blob, blob_id)
    if b is None or b.kind != kind or not viewer.may_see(b.owner):
        raise NotFound(kind, blob_id)
    return b


class RecordsMixin:
    """Uploads, tokens and the health check of :class:`~bocompress.service.db.sql_store.OrmStore`."""

    async def ping(self) -> str:
        """Check that the database answers (one ``SELECT 1``): its dialect's name."""
        def _ping(s: Session) -> str:
            s.execute(text("SELECT 1"))
            return str(self.dialect)  # type: ignore[attr-defined]

        return await self._read(_ping)  # type: ignore[attr-defined, no-any-return]

    # -------------------------------------------------------------- uploads

    async def add_upload(self, viewer: Any, kind: str, data: bytes, tensors: dict[str, Any],
                         arch: str | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keep an upload of ``viewer.owner`` (its safetensors header already checked): its view."""
        def _add() -> dict[str, Any]:
            # Hashed before the transaction: a large file never holds SQLite's write lock while it is read.
            blob = new_blob(kind, viewer.owner, data, tensors, arch=arch, meta=meta)

            def _insert(s: Session) -> dict[str, Any]:
                s.add(blob)
                s.flush()
                return blob_out(blob)

            return run_tx(self.factory, _insert)  # type: ignore[attr-defined]

        return await anyio.to_thread.run_sync(_add)

    async def get_upload(self, blob_id: str, kind: str, viewer: Any) -> dict[str, Any]:
        """An upload of ``kind`` the viewer may see, summarized; else NotFound."""
        return await self._read(lambda s: blob_out(_visible_blob(s, blob_id, kind, viewer)))  # type: ignore[attr-defined, no-any-return]

    async def upload_file(self, blob_id: str, kind: str, viewer: Any) -> tuple[bytes, str]:
        """An upload's bytes and sha256; NotFound as :meth:`get_upload`."""
        def _file(s: Session) -> tuple[bytes, str]:
            b = _visible_blob(s, blob_id, kind, viewer)
            return b.data, b.sha256

        return await self._read(_file)  # type: ignore[attr-defined, no-any-return]

    # -------------------------------------------------------------- tokens

    async def create_token(self, role: str, owner: str | None, name: str | None) -> dict[str, Any]:
        """Mint a token: its view with the secret (shown this once)."""
        def _mk(s: Session) -> dict[str, Any]:
            tok, secret = issue(s, role, owner, name)
            return token_out(tok, secret)

        return await self._tx(_mk)  # type: ignore[attr-defined, no-any-return]

    async def list_tokens(self) -> list[dict[str, Any]]:
        """Every token (revoked ones included), by id; no secrets."""
        return await self._read(  # type: ignore[attr-defined, no-any-return]
            lambda s: [token_out(t) for t in s.execute(select(Token).order_by(Token.id)).scalars()])

    async def revoke_token(self, token_id: int) -> dict[str, Any]:
        """Revoke a token (again: a no-op): its view; NotFound for an unknown id."""
        def _rv(s: Session) -> dict[str, Any]:
            t = s.get(Token, token_id)
            if t is None:
                raise NotFound("token", token_id)
            revoke(s, token_id)
            s.refresh(t)
            return token_out(t)

        return await self._tx(_rv)  # type: ignore[attr-defined, no-any-return]

    def principal(self, secret: str) -> Principal | None:
        """The caller a token's secret names; None when unknown or revoked (blocking: a thread's call)."""
        with read_session(self.factory) as s:  # type: ignore[attr-defined]
            return lookup(s, secret)


__all__ = ["SUMMARY_TENSORS", "RecordsMixin", "blob_out", "token_out"]
