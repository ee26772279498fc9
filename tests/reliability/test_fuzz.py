"""Fuzzing: schemathesis against the app's own OpenAPI schema, every endpoint, bounded examples.

Requests carry an admin token (the role that reaches the most code) into a service on SQLite and
on PostgreSQL (each refuses different values) holding a running compression job (id 1) and a
generic job (id 2), so some generated ids exist. Checks: never a 5xx, and a response conforms to its schema where the
schema declares one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.app import create_app
from service.auth import create_token
from service.config import Settings
from service.db.migrate import upgrade
from tests.conftest import drop_pg_database, new_database
from tests.service.helpers import compression_job, profile_job

MAX_EXAMPLES = 20


@pytest.fixture(params=["sqlite", "postgresql"])
def fuzz_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[object, str]]:
    """The app on a fresh database, with data in it; yields (app, database URL)."""
    db = new_database(request.param, tmp_path, "fuzz")
    upgrade(db)
    token = create_token(db, "admin", "admin", "fuzz")
    app = create_app(Settings(database_url=db, scheduler_interval=0.1, ask_wait_seconds=0.0,
                              max_upload_bytes=64 * 1024))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        # something real for generated ids to hit: job 1 (compression, running), job 2 (generic)
        job = compression_job(c, max_trials=6, max_parallel=2)
        profile_job(c, job["id"])
        r = c.post("/api/v1/jobs", json={"name": "g", "parameters": [{"name": "x", "low": 0, "high": 1}],
                                         "budget": {"max_trials": 5}})
        assert r.status_code == 201, r.text
        yield app, db
    if request.param == "postgresql":
        drop_pg_database(db)


def _operations(app: object) -> list[object]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [r.ok() for r in schema.get_all_operations()]


def test_every_operation_no_5xx_and_schema_conformance(fuzz_env: tuple[object, str]) -> None:
    """Each operation gets ``MAX_EXAMPLES`` generated requests; failures are collected, not stopped at."""
    app, db = fuzz_env
    # the revoke operation may revoke the token it is called with: run it last, and give each
    # operation a fresh admin token
    ops = sorted(_operations(app), key=lambda op: "revoke" in op.label)
    assert len(ops) >= 20, [op.label for op in ops]  # the schema lists the whole API
    failures: dict[str, str] = {}
    statuses: Counter[int] = Counter()
    for op in ops:
        token = create_token(db, "admin", "admin", f"fuzz {op.label}")

        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        def run(case: schemathesis.Case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - report every failing operation at once
            failures[op.label] = str(exc)[:1500]
    print(f"{len(ops)} operations, {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= len(ops) * 3, "the fuzzer sent too few requests"
    assert statuses[401] <= len(ops), "most requests were refused: the fuzzer tested the auth wall only"
    assert failures == {}, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
