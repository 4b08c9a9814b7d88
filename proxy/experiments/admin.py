"""``/admin/experiments``: the experiments' live state with the estimator's verdict, and the
live ramp (behind ``server.admin_token`` like every /admin path).

* ``GET /admin/experiments``: per experiment its weights, state, rollback rule and the
  numbers of its last check, assignments, shadow results and queue, and ``verdict``: the
  estimator's comparison (``estimator.compare.Verdict``) or why there is none yet; the groups
  with their backends and description; model version drift per group.
* ``POST /admin/experiments/<name>`` with ``{"weight": 0.1}`` and/or ``{"shadow": 0.5}``:
  set the canary weight or the shadow share now (0..1); a weight given to a rolled-back
  experiment resumes it. Answers the experiment's new state.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest, NotFound
from ..handlers import PROXY, Proxy, check_admin
from ..validate import parse_json_object
from .drift import drift


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def verdicts(px: Proxy) -> list[dict[str, Any]]:
    """The estimator's experiment reports (empty without an estimator or a report)."""
    report = px.report() if px.report is not None else None
    found = report.get("experiments") if isinstance(report, dict) else None
    return [v for v in found or () if isinstance(v, dict)]


def snapshot(px: Proxy) -> dict[str, Any]:
    exps = px.experiments
    assert exps is not None
    by_name = {v.get("experiment"): v for v in verdicts(px)}
    out = []
    for status in exps.statuses():
        name = status["name"]
        status["shadow_queue"] = px.shadow.depth(name) if px.shadow is not None else 0
        status["verdict"] = by_name.get(name) or {
            "status": "no_verdict",
            "detail": "the estimator is off"
            if px.report is None
            else "the estimator has not compared the groups yet (it refreshes every "
            f"{px.config.estimator.refresh_interval_s:g}s and needs "
            f"{exps.by_name[name].config.min_requests} requests per group)",
        }
        out.append(status)
    groups = [{**dataclasses.asdict(g), "backends": list(g.backends)} for g in exps.groups.values()]
    drifts = [
        {
            "group": d.group,
            "model": d.model,
            "distinct_versions": d.distinct,
            "versions": d.versions,
        }
        for d in drift(px.pool.backends, exps.group_of, time.monotonic())
    ]
    return {"experiments": out, "groups": groups, "drift": drifts}


async def get_experiments(request: web.Request) -> web.Response:
    px = request.app[PROXY]
    check_admin(request, px.config.server.admin_token)
    if px.experiments is None:
        return _json({"experiments": [], "groups": [], "drift": []})
    return _json(snapshot(px))


async def set_experiment(request: web.Request) -> web.Response:
    px = request.app[PROXY]
    check_admin(request, px.config.server.admin_token)
    name = request.match_info["name"]
    exps = px.experiments
    if exps is None or name not in exps.by_name:
        raise NotFound(f"No experiment named '{name[:100]}'.", param="name")
    body = parse_json_object(await request.read())
    unknown = set(body) - {"weight", "shadow"}
    if unknown or not body:
        raise InvalidRequest(
            "Give 'weight' and/or 'shadow', each a number in [0, 1].",
            param=next(iter(unknown), None),
        )
    values: dict[str, float] = {}
    for key in ("weight", "shadow"):
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise InvalidRequest(f"'{key}' must be a number in [0, 1].", param=key)
        values[key] = float(v)
    exps.set(name, weight=values.get("weight"), shadow=values.get("shadow"))
    return _json(exps.status(name))
