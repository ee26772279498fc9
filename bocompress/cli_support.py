"""What the client-side commands of the ``bocompress`` CLI compute without Typer: the job specs a
submit file stands for (``jobs: [...]``, sweeps), their check against the wire schema, and the
``status`` table.

Imports only the contract (pydantic is imported when specs are validated), so ``bocompress --help``
stays instant.
"""

from __future__ import annotations

import itertools
from typing import Any

from .errors import BocompressError

__all__ = ["expand_specs", "validate_specs", "fmt_counts", "best_value", "table"]


def _set_dotted(spec: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``spec['a']['b'] = value`` for ``dotted == 'a.b'``, creating missing mappings."""
    keys = dotted.split(".")
    node = spec
    for i, key in enumerate(keys[:-1]):
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise BocompressError(f"sweep key {dotted!r}: {'.'.join(keys[:i + 1])} is not a mapping")
        node = nxt
    node[keys[-1]] = value


def expand_specs(document: Any) -> list[dict[str, Any]]:
    """Turn a submit YAML document into the list of job specs it stands for.

    The document is one job spec, or ``{"jobs": [spec, ...]}``. An optional ``sweep`` mapping,
    at the top level (applies to every job) or inside one job, maps dotted keys to lists of
    values; a spec is expanded into the Cartesian product of them, each copy named
    ``<name>[key=value,...]``.

    Args:
        document: The parsed YAML.

    Returns:
        The job specs, in order.

    Raises:
        BocompressError: The document has the wrong shape.
    """
    import copy

    if not isinstance(document, dict):
        raise BocompressError("the file must hold a job spec (a mapping) or 'jobs: [...]'")
    document = copy.deepcopy(document)
    top_sweep = document.pop("sweep", None) or {}
    if "jobs" in document:
        extra = set(document) - {"jobs"}
        if extra:
            raise BocompressError(f"next to 'jobs' only 'sweep' is allowed, found {sorted(extra)}")
        jobs = document["jobs"]
        if not isinstance(jobs, list) or not jobs:
            raise BocompressError("'jobs' must be a non-empty list of job specs")
    else:
        jobs = [document]
    out: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        if not isinstance(job, dict):
            raise BocompressError(f"jobs[{i}] must be a mapping, got {type(job).__name__}")
        sweep = {**top_sweep, **(job.pop("sweep", None) or {})}
        if not isinstance(sweep, dict):
            raise BocompressError("'sweep' must map dotted keys to lists of values")
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise BocompressError(f"sweep {key!r}: give a non-empty list of values")
        keys = list(sweep)
        for combo in itertools.product(*(sweep[k] for k in keys)):
            spec = copy.deepcopy(job)
            for key, value in zip(keys, combo):
                _set_dotted(spec, key, value)
            if keys:
                tag = ",".join(f"{k}={v}" for k, v in zip(keys, combo))
                spec["name"] = f"{spec.get('name', 'job')}[{tag}]"
            out.append(spec)
    return out


def validate_specs(specs: list[dict[str, Any]]) -> None:
    """Check each spec against the wire schema; the first mistake is a one-line error."""
    from pydantic import ValidationError

    from .schemas import JobCreate

    for i, spec in enumerate(specs):
        try:
            JobCreate.model_validate(spec)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            where = f"job {i} ({spec.get('name', '?')})"
            raise BocompressError(f"{where}: {loc + ': ' if loc else ''}{err['msg']}") from exc


def fmt_counts(counts: dict[str, int]) -> str:
    """Trial counts as ``state=n`` pairs, the states with none left out."""
    return " ".join(f"{k}={v}" for k, v in counts.items() if v)


def best_value(job: dict[str, Any]) -> str:
    """The best trial's value of the job's metric (4 significant digits), or "" before one completes."""
    best = job.get("best") or {}
    from bocompress.spec import JobSpec

    metric = JobSpec.of(job.get("spec") or {}).metric
    value = (best.get("values") or {}).get(metric)
    return "" if value is None else f"{value:.4g}"


def fmt_pipeline(pipe: dict[str, Any] | None) -> str:
    """A job's pipeline in one line (``""`` for a job of none): kind, stage, this job's pass,
    the jobs, and the total R once done (or the reason it failed)."""
    if not pipe:
        return ""
    out = f"{pipe.get('kind')} {pipe.get('stage')} (pass {pipe.get('pass')} of jobs " \
          f"{', '.join(str(j) for j in pipe.get('jobs') or [])})"
    if pipe.get("total_ratio") is not None:
        out += f", total R={float(pipe['total_ratio']):.4g}"
    if pipe.get("stage") in ("failed", "cancelled") and pipe.get("reason"):
        out += f": {pipe['reason']}"
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    """``rows`` under ``header`` as left-aligned columns two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)

