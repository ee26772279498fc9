"""Service settings, from arguments or ``BOCOMPRESS_*`` environment variables."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the service reads from its environment.

    Refuses unsafe combinations: running without auth is allowed only on a loopback address.
    """

    model_config = SettingsConfigDict(env_prefix="BOCOMPRESS_", extra="ignore")

    database_url: str = Field(default="sqlite:///./bocompress.db")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth: bool = Field(default=True, description="require bearer tokens; off is allowed only on loopback")
    auto_migrate: bool | None = Field(
        default=None, description="upgrade the schema on start; default: on for SQLite, off for PostgreSQL"
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "warning"
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_safetensors_header_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024,
        description="largest JSON header of an uploaded safetensors file (bytes); refused before it is parsed")
    max_safetensors_tensors: int = Field(default=50_000, ge=1, le=10_000_000,
                                         description="most tensors in one uploaded safetensors file")
    scheduler: bool = Field(default=True, description="run the proposal/lease-reaper loop in this process")
    scheduler_interval: float = Field(default=0.5, gt=0.0, le=60.0)
    generator_lease_seconds: float = Field(default=120.0, gt=1.0)
    max_proposal_failures: int = Field(default=5, ge=1, le=1000,
                                       description="a job whose proposals fail this many times in a row is failed")
    threads: int = Field(default=8, ge=1, le=256,
                         description="threads that run database work, per server process (at most this many at once); "
                                     "on PostgreSQL the worker loop and the trial polls run on the event loop instead")
    engine_process: bool = Field(default=True, description="compute proposals in a child process (off: in a thread)")
    engine_nice: int = Field(default=0, ge=0, le=19, description="the engine process's niceness (0: the service's "
                             "own priority); above 0 its fits yield the CPU to the requests on a busy machine, but a "
                             "lone consumer and a new job's first batch then wait longer for the engine")
    ask_wait_seconds: float = Field(default=20.0, ge=0.0, le=300.0)
    cheap_proposals: Literal["auto", "perturb", "quasirandom", "off"] = Field(
        default="auto", description="how a lease or ask that finds its job's buffer empty is answered at once "
        "(service/optimizer/cheap.py): 'auto' (perturb the incumbent, quasi-random before there is one), "
        "'perturb', 'quasirandom'; 'off': wait for the engine's next batch. Only for parallel demand (another "
        "consumer holds one of the job's trials, or other asks of the job wait): a lone sequential worker or asker "
        "always waits for the engine")
    replica: str = Field(default="", description="name of this replica (default host:pid)")

    @model_validator(mode="after")
    def _refuse_open_non_loopback(self) -> "Settings":
        if not self.auth and not is_loopback(self.host):
            raise ValueError(
                f"auth is off but host {self.host!r} is not a loopback address: "
                "turn auth on (BOCOMPRESS_AUTH=1) or bind to 127.0.0.1"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def migrate_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate
