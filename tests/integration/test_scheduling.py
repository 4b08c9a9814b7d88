"""Admission end to end: a real proxy process holding the queue in front of a small emulated
engine, under more load than it can serve, with mixed priorities and tenants."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path

import httpx2 as httpx
import orjson
import pytest

from tests.support.procs import metric_value, read_records, start_emulator, start_proxy

pytestmark = pytest.mark.integration


async def _fire(url: str, specs: list[dict[str, str]], max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as c:
        body = orjson.dumps({"model": "emu", "prompt": "x", "max_tokens": max_tokens})

        async def one(h: dict[str, str]) -> httpx.Response:
            return await c.post(url + "/v1/completions", content=body, headers=h)

        return list(await asyncio.gather(*(one(h) for h in specs)))


def test_overload_sheds_low_classes_and_loses_nothing(tmp_path: Path) -> None:
    emu = start_emulator("emu", ttft=0.01, itl=0.02, max_num_seqs=4)
    log = tmp_path / "r.jsonl"
    cfg = {"backends": [{"url": emu.url, "max_inflight": 4}],
           "scheduling": {"shed_sheddable_above": 0.75, "deadline_s": {"low": 0.6}},
           "health": {"scrape_interval_s": 0}}  # fmt: skip
    p = start_proxy([], config=cfg, request_log=log)
    try:
        classes = ["critical", "high", "normal", "low", "sheddable"] * 12
        before = metric_value(emu.metrics_text(), "vllm:request_success_total")
        responses = asyncio.run(_fire(p.url, [{"x-priority": c} for c in classes], max_tokens=10))
        outcome: Counter[tuple[str, int]] = Counter()
        for klass, r in zip(classes, responses, strict=True):
            outcome[klass, r.status_code] += 1
            assert r.status_code in (200, 429), r.text
            if r.status_code == 429:
                assert r.headers["Retry-After"] and r.headers["x-rightsizer-shed-reason"]
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert outcome["critical", 200] == 12 and outcome["high", 200] == 12
        assert outcome["sheddable", 429] >= 8, outcome
        assert outcome["low", 429] >= 1, outcome  # waited past its 0.6 s deadline
        served = sum(n for (_, status), n in outcome.items() if status == 200)
        after = metric_value(emu.metrics_text(), "vllm:request_success_total")
        assert after - before == served, "shed requests never reached the engine"
        recs = read_records(log)
        assert len(recs) == 60, "one record per request, shed ones included"
        assert Counter(r["outcome"] for r in recs) == Counter({"ok": served, "shed": 60 - served})
        text = p.metrics_text()
        assert metric_value(text, "rightsizer_shed_total", reason="deadline_exceeded") >= 1
        assert metric_value(text, "rightsizer_shed_total", priority="sheddable") >= 8
    finally:
        p.stop()
        emu.stop()


def test_tenant_limits_and_api_keys_over_http(tmp_path: Path) -> None:
    emu = start_emulator("emu", itl=0.02)
    digest = hashlib.sha256(b"sk-team-a").hexdigest()
    cfg = {"backends": [{"url": emu.url}], "auth": {"required": True},
           "tenants": [{"name": "team-a", "api_key_sha256": [digest], "max_concurrency": 2}]}  # fmt: skip
    p = start_proxy([], config=cfg)
    try:
        r = httpx.post(
            p.url + "/v1/completions", content=b'{"model":"emu","prompt":"x","max_tokens":1}'
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sk-team-a"}
        responses = asyncio.run(_fire(p.url, [auth] * 6, max_tokens=20))
        codes = Counter(r.status_code for r in responses)
        assert codes[200] >= 2 and codes[429] >= 1, codes
        shed = [r for r in responses if r.status_code == 429]
        assert all(r.headers["x-rightsizer-shed-reason"] == "tenant_concurrency" for r in shed)
        assert "sk-team-a" not in p.metrics_text() and "sk-team-a" not in p.log_path.read_text()
        assert 'tenant="team-a"' in p.metrics_text()
    finally:
        p.stop()
        emu.stop()
