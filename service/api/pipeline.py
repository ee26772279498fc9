"""What a pipeline job (``recipe`` in its spec) must be, checked before any work (a 422 naming the field).

A ``"recipe": {"kind": "two-pass", ...}`` job is the first pass of Ma et al.'s recipe: BO over one
layer type (Conv2d, tucker2 by default); the service then fine-tunes its best trial by
distillation and starts a second job over the other type (Linear, svd) of the fine-tuned model
(:mod:`bocompress.service.db.pipeline`). Here the request is checked and the stored spec made:
the job's ``compression.method``/``layers`` become the first pass's, and ``recipe`` keeps both
passes' methods and layers filled in.
"""

from __future__ import annotations

from typing import Any

from bocompress.schemas import METHOD_TYPES, JobCreate, RecipeFirst, RecipeSecond
from bocompress.service.api.errors import bad_request

#: Each pass's layer type and its default method (the paper's VGG-16 recipe).
PASS_TYPE = {"first": "Conv2d", "second": "Linear"}
PASS_DEFAULT = {"first": "tucker2", "second": "svd"}


def _default_method(job_method: str | dict[str, str], name: str) -> dict[str, str]:
    """A pass's method when the recipe names none: the job's for that layer type (a mapping's entry,
    or one method, when it compresses that type; svd only for Linear), else the paper's."""
    t = PASS_TYPE[name]
    m = job_method.get(t) if isinstance(job_method, dict) else job_method
    if m is not None and t in METHOD_TYPES.get(m, ()) and not (m == "svd" and t == "Conv2d"
                                                              and not isinstance(job_method, dict)):
        return {t: m}
    return {t: PASS_DEFAULT[name]}


def _pass(body: JobCreate, name: str, p: RecipeFirst | RecipeSecond) -> dict[str, Any]:
    """A pass's method (a mapping of its one layer type) and layers. The schema already refuses a
    method that compresses none of the pass's layer type (``recipe.second.method``: tucker2)."""
    c = body.compression
    assert c is not None
    if p.method is None:
        method = _default_method(c.method, name)
    else:
        method = dict(p.method) if isinstance(p.method, dict) else {PASS_TYPE[name]: p.method}
    layers = p.layers if p.layers is not None else c.layers
    return {"method": method, "layers": layers if isinstance(layers, list) else layers.model_dump(mode="json")}


def recipe_spec(body: JobCreate, spec: dict[str, Any]) -> dict[str, Any]:
    """The stored spec of a pipeline's first job: checked, the passes filled in.

    Raises:
        APIError: 422 naming the field that makes the recipe one the service cannot run.
    """
    r = body.recipe
    assert r is not None
    if not body.is_compression:
        raise bad_request("recipe", "a recipe compresses a model: it needs a compression job, not an ask/tell one")
    if body.optimizer.engine == "chipnet":
        raise bad_request("recipe", "a two-pass recipe runs BO in each pass: it does not combine with "
                          "optimizer.engine 'chipnet'")
    first, second = _pass(body, "first", r.first), _pass(body, "second", r.second)
    out = dict(spec)
    out["compression"] = {**out["compression"], "method": first["method"], "layers": first["layers"]}
    out["recipe"] = {"kind": r.kind, "first": first, "second": second,
                     "finetune": r.finetune.model_dump(mode="json", exclude_none=True)}
    return out


__all__ = ["PASS_DEFAULT", "PASS_TYPE", "recipe_spec"]
