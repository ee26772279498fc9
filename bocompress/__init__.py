"""bocompress: Bayesian optimization of per-layer neural network compression, as a service.

What a user imports: :class:`Client` (talks to a bocompress service over HTTP), :class:`Job`
(a handle on one job: wait, trials as a DataFrame, plot, ask/tell, export) and the typed errors.
Importing this package loads only httpx and pydantic; torch, pandas, matplotlib and tqdm are
loaded by the methods that need them, so a notebook that only talks to a remote service stays
light.

Example::

    import bocompress
    with bocompress.Client() as client:          # BOCOMPRESS_URL / BOCOMPRESS_TOKEN
        job = client.create_job({"name": "digits-svd",
                                 "compression": {"model": "digits-cnn", "data": "digits",
                                                 "method": "svd"}})
        job.wait()
        print(job.trials().head())
"""

from __future__ import annotations

from pathlib import Path as _Path

# The service, the worker and the migrations are the subpackages ``bocompress.service``,
# ``bocompress.worker`` and ``bocompress.migrations``. A wheel installs them inside this package; in
# a source checkout (``make venv``, or PYTHONPATH at the clone) they stay the repository's
# top-level folders, found through this package's path.
_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "service" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # type: ignore[name-defined]  # noqa: F821

from .client import DEFAULT_URL, JOB_DONE_STATES, Client, CollapseWarning, Job
from .errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BocompressError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from .compressed import load_compressed, save_compressed
from .schemas import JobCreate

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Job",
    "CollapseWarning",
    "JobCreate",
    "load_compressed",
    "save_compressed",
    "DEFAULT_URL",
    "JOB_DONE_STATES",
    "BocompressError",
    "WaitTimeoutError",
    "APIError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "__version__",
]
