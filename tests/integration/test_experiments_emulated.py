"""Experiments through the real proxy process, in front of emulated engines (fast, no real
engine): canary split and stickiness, shadow copies that never delay or reach the client and
shed first, the live ramp, automatic rollback with no client request lost, model version
drift, and the live verdict through ``rightsizer compare --url``."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.support import openloop as ol
from tests.support.procs import (
    Proc,
    http_get,
    metric_value,
    read_records,
    start_emulator,
    start_proxy,
    wait_for,
)

pytestmark = pytest.mark.integration


def config(base: Proc, cand: Proc, **experiment: Any) -> dict[str, Any]:
    return {
        "backends": [{"url": base.url, "name": "base-0"}, {"url": cand.url, "name": "cand-0"}],
        "groups": [{"name": "base", "backends": ["base-0"], "gpu": "a100-80gb"},
                   {"name": "cand", "backends": ["cand-0"], "gpu": "h100-sxm"}],
        "experiments": [{"name": "exp", "baseline": "base", "candidate": "cand",
                         "min_requests": 20, **experiment}],
        "health": {"interval_s": 0.5, "scrape_interval_s": 1.0},
        "estimator": {"refresh_interval_s": 2.0, "min_records": 20},
    }  # fmt: skip


def admin(proxy: Proc) -> dict[str, Any]:
    status, body = http_get(proxy.url + "/admin/experiments")
    assert status == 200, body
    data: dict[str, Any] = orjson.loads(body)
    return data


def post(proxy: Proc, name: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(proxy.url + f"/admin/experiments/{name}",
                                 data=orjson.dumps(payload), method="POST")  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def traffic(proxy: Proc, n: int, rate: float, seed: int = 1, **kw: Any) -> list[ol.Sent]:
    rng = np.random.default_rng(seed)
    bodies = ol.chat_requests(n, rng, words=(10, 40), output=(8, 16))
    return asyncio.run(ol.run_poisson(proxy.url, "emu", bodies, rate, rng, **kw))


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Proc, Proc]]:
    cand_kw = getattr(request, "param", {})
    base = start_emulator("emu", ttft=0.02, itl=0.004)
    cand = start_emulator("emu", **{"ttft": 0.01, "itl": 0.002, **cand_kw})
    yield base, cand
    base.stop()
    cand.stop()


def test_canary_split_shadow_copies_and_live_ramp(pair: tuple[Proc, Proc], tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    proxy = start_proxy([], config=config(*pair, weight=0.3, stickiness="session",
                                          shadow={"share": 1.0}), request_log=log)  # fmt: skip
    try:
        sessions = [f"s{i % 40}" for i in range(240)]
        sent = traffic(proxy, 240, 40.0, headers=[{"x-session-id": s} for s in sessions])
        assert all(r.ok for r in sent)
        wait_for(lambda: sum(not r["shadow"] for r in read_records(log)) >= 240, 10)
        recs = read_records(log)
        live = {r["request_id"]: r for r in recs if not r["shadow"]}
        by_session: dict[str, set[str]] = {}
        for s, r in zip(sessions, sent, strict=True):
            by_session.setdefault(s, set()).add(str(live[str(r.request_id)]["group"]))
        assert all(len(g) == 1 for g in by_session.values()), "a session changed group"
        on_cand = sum(g == {"cand"} for g in by_session.values())
        assert 0 < on_cand < 40  # 30% of 40 sessions, within chance
        # every baseline request was mirrored once; copies carry the client request's id
        shadow = [r for r in recs if r["shadow"]]
        base_ids = {i for i, r in live.items() if r["group"] == "base"}
        assert {r["request_id"] for r in shadow} <= base_ids
        assert all(r["group"] == "cand" and r["backend"] == "cand-0" for r in shadow)
        wait_for(lambda: sum(admin(proxy)["experiments"][0]["shadow"].values()) >= len(base_ids))
        assert admin(proxy)["experiments"][0]["shadow"].get("ok", 0) >= 0.9 * len(base_ids)
        text = proxy.metrics_text()
        assert metric_value(text, "rightsizer_group_requests_total", group="cand",
                            traffic="shadow") == len(shadow)  # fmt: skip
        assert metric_value(text, "rightsizer_requests_total") == 240, "copies are not requests"
        # live ramp without a restart
        status, body = post(proxy, "exp", {"weight": 1.0})
        assert status == 200 and body["weight"] == 1.0
        assert metric_value(proxy.metrics_text(), "rightsizer_experiment_weight",
                            experiment="exp", group="cand") == 1.0  # fmt: skip
        assert post(proxy, "exp", {"weight": 2})[0] == 400
        assert post(proxy, "nope", {"weight": 0.1})[0] == 404
    finally:
        proxy.stop()


@pytest.mark.parametrize("pair", [{"ttft": 1.5, "itl": 0.05, "max_num_seqs": 2}],
                         indirect=True, ids=["slow-candidate"])  # fmt: skip
def test_shadow_never_delays_clients_and_sheds_first(pair: tuple[Proc, Proc]) -> None:
    """The candidate takes 1.5 s to a first token and runs two requests at once: shadow copies
    of a 60 req/s burst pile up on a queue of 8 and are dropped; no client waits for them."""
    proxy = start_proxy([], config=config(*pair, weight=0.0, shadow={
        "share": 1.0, "queue": 8, "concurrency": 2, "max_delay_s": 0.5}))  # fmt: skip
    try:
        sent = traffic(proxy, 150, 60.0)
        assert all(r.ok for r in sent), "every client request answered"
        ttft = sorted(r.ttft for r in sent if r.ttft is not None)
        assert ttft[int(0.95 * len(ttft))] < 0.5, "a client waited for its shadow copy"
        exp = admin(proxy)["experiments"][0]
        dropped = sum(v for k, v in exp["shadow"].items() if k.startswith("dropped"))
        assert dropped > 100, exp["shadow"]
        assert exp["shadow_queue"] <= 8
    finally:
        proxy.stop()


def test_rollback_on_a_failing_candidate_loses_no_request(pair: tuple[Proc, Proc]) -> None:
    base, cand = pair
    proxy = start_proxy([], config=config(base, cand, weight=0.5, rollback={
        "window_s": 10.0, "min_samples": 5, "interval_s": 0.5}))  # fmt: skip
    try:
        assert all(r.ok for r in traffic(proxy, 40, 20.0))
        cand.kill()  # connection refused from now on
        t_fail = time.monotonic()
        sent = traffic(proxy, 200, 20.0, seed=2)
        assert all(r.ok for r in sent), [r.error for r in sent if not r.ok][:3]
        wait_for(lambda: admin(proxy)["experiments"][0]["state"] == "rolled_back", 15)
        exp = admin(proxy)["experiments"][0]
        assert time.monotonic() - t_fail < 10.0 + 3.0  # within the window (and a check)
        assert exp["weight"] == 0.0 and exp["rolled_back"]["reason"] in ("errors", "unavailable")
        assert metric_value(proxy.metrics_text(), "rightsizer_experiment_rollbacks_total",
                            experiment="exp") == 1  # fmt: skip
        assert "rolled back" in proxy.log_tail(200)
    finally:
        proxy.stop()


def test_drift_between_backends_of_one_group() -> None:
    a = start_emulator("emu", extra=["--max-model-len", "4096"])
    b = start_emulator("emu", extra=["--max-model-len", "8192"])
    c = start_emulator("emu", extra=["--max-model-len", "8192"])
    cfg = {"backends": [{"url": p.url, "name": n} for p, n in ((a, "a"), (b, "b"), (c, "c"))],
           "groups": [{"name": "fleet", "backends": ["a", "b"]}, {"name": "other",
                                                                  "backends": ["c"]}]}  # fmt: skip
    proxy = start_proxy([], config=cfg)
    try:
        text = proxy.metrics_text()
        assert metric_value(text, "rightsizer_model_version_drift", group="fleet") == 1
        assert metric_value(text, "rightsizer_model_version_drift", group="other") == 0
        drift = {d["group"]: d for d in admin(proxy)["drift"]}
        assert len(set(drift["fleet"]["versions"].values())) == 2
    finally:
        proxy.stop()
        for p in (a, b, c):
            p.stop()


def test_live_verdict_and_compare_cli(pair: tuple[Proc, Proc]) -> None:
    proxy = start_proxy([], config=config(*pair, weight=0.5, shadow={"share": 1.0}))
    try:
        assert all(r.ok for r in traffic(proxy, 200, 50.0))

        def verdict() -> dict[str, Any]:
            return admin(proxy)["experiments"][0]["verdict"]  # type: ignore[no-any-return]

        wait_for(lambda: verdict().get("status") == "ok", 30, 0.5)
        v = verdict()
        assert v["paired_requests"] >= 30 and len(v["groups"]) == 2
        assert {g["group"] for g in v["groups"]} == {"base", "cand"}
        assert v["methods"]["latency"].startswith("percentile bootstrap")
        out = subprocess.run([sys.executable, "-m", "proxy", "compare", "--url", proxy.url],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "experiment exp (emu)" in out.stdout and "verdict:" in out.stdout
        assert not math.isnan(float(v["rate_rps"]))
    finally:
        proxy.stop()


def test_assignments_are_counted_by_reason(pair: tuple[Proc, Proc]) -> None:
    proxy = start_proxy([], config=config(*pair, weight=0.0, tenants=["beta"]))
    try:
        sent = traffic(proxy, 30, 30.0, headers=[{"x-tenant": "beta"}] * 10
                       + [{"x-rightsizer-group": "cand"}] * 10 + [{}] * 10)  # fmt: skip
        assert all(r.ok for r in sent)
        got = Counter(admin(proxy)["experiments"][0]["assignments"])
        assert got == {"cand/tenant": 10, "cand/header": 10, "base/weight": 10}
    finally:
        proxy.stop()
