"""The proxy as a real process in front of real emulated-engine processes, driven by the real
``openai`` SDK over loopback: faithfulness, errors, failure handling, a bounded load."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx  # the openai SDK's own HTTP client
import openai
import orjson
import pytest

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


@pytest.fixture(scope="module")
def emus() -> Iterator[tuple[Proc, Proc]]:
    a = start_emulator("emu", ttft=0.02, itl=0.004)
    b = start_emulator("emu", ttft=0.02, itl=0.004)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def proxy(emus: tuple[Proc, Proc], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    p = start_proxy([emus[0].url, emus[1].url], request_log=log)
    p.extra["log"] = log
    yield p
    p.stop()


def client(proxy: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


def records_for(proxy: Proc, request_id: str) -> list[dict[str, object]]:
    log = proxy.extra["log"]
    assert isinstance(log, Path)
    wait_for(lambda: any(r["request_id"] == request_id for r in read_records(log)), 5)
    return [r for r in read_records(log) if r["request_id"] == request_id]


def test_models_lists_each_model_once(proxy: Proc) -> None:
    ids = [m.id for m in client(proxy).models.list()]
    assert ids == ["emu"]


def test_chat_stream_without_usage_is_stripped_and_counted(proxy: Proc) -> None:
    stream = client(proxy).chat.completions.create(
        model="emu", messages=[{"role": "user", "content": "hello " * 40}], max_tokens=12,
        stream=True, extra_headers={"x-request-id": "strip-1"},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.usage is None for c in chunks), "the usage chunk the proxy asked for leaked"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(1, 13))
    (rec,) = records_for(proxy, "strip-1")
    assert rec["completion_tokens"] == 12 and rec["tokens_estimated"] is False
    assert rec["prompt_tokens"] == len("user:" + "hello " * 40 + "\n") // 4
    assert rec["outcome"] == "ok" and rec["finish_reason"] == "length" and rec["streamed"] is True
    assert rec["itl"]["count"] == 11  # 12 content chunks, 11 gaps
    assert rec["first_token_s"] >= rec["dispatch_s"] >= rec["arrival_s"]


def test_chat_stream_with_usage_passes_it_through(proxy: Proc) -> None:
    stream = client(proxy).chat.completions.create(
        model="emu", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_non_stream_completion_matches_direct(proxy: Proc, emus: tuple[Proc, Proc]) -> None:
    via = client(proxy).completions.create(model="emu", prompt="abc " * 10, max_tokens=7)
    direct = openai.OpenAI(base_url=emus[0].url + "/v1", api_key="x").completions.create(
        model="emu", prompt="abc " * 10, max_tokens=7
    )
    assert via.choices[0].text == direct.choices[0].text
    assert via.usage is not None and direct.usage is not None
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    assert via.usage.completion_tokens == direct.usage.completion_tokens == 7


async def test_async_streaming_sdk(proxy: Proc) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c:
        stream = await c.completions.create(model="emu", prompt="x", max_tokens=6, stream=True)
        text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
    assert text == "".join(f"tok{i} " for i in range(1, 7))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[]", 400, "JSON object"),
        (b'{"messages":[{"role":"user","content":"x"}]}', 400, "'model' is required"),
        (b'{"model":"emu"}', 400, "'messages'"),
        (b'{"model":"emu","messages":"hi"}', 400, "'messages'"),
        (b'{"model":"emu","messages":[{"content":"x"}]}', 400, "role"),
        (b'{"model":"emu","messages":[{"role":"user","content":"x"}],"stream":"yes"}', 400, "stream"),
        (b'{"model":"emu","messages":[{"role":"user","content":"x"}],"max_tokens":-1}', 400, "max_tokens"),
        (b'{"model":"nope","messages":[{"role":"user","content":"x"}]}', 404, "nope"),
    ],
    ids=["malformed", "not-object", "no-model", "no-messages", "messages-type", "no-role",
         "stream-type", "max-tokens", "unknown-model"],
)  # fmt: skip
def test_bad_requests_get_openai_errors(proxy: Proc, body: bytes, status: int, needle: str) -> None:
    r = httpx.post(proxy.url + "/v1/chat/completions", content=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]


def test_sdk_raises_typed_errors(proxy: Proc) -> None:
    with pytest.raises(openai.NotFoundError):
        client(proxy).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/chat/completions", None, 405),
        ("PUT", "/v1/completions", b"{}", 405),
        ("GET", "/nothing-here", None, 404),
        ("POST", "/v1/completions", b'{"model":"emu","prompt":' + b'"a' * 3_000_000 + b'"}', 413),
        ("POST", "/v1/completions", b'{"model":"emu","prompt":{"a":1}}', 400),
    ],
    ids=["get-chat", "put-completions", "unknown-path", "too-large", "prompt-type"],
)
def test_routing_level_errors(
    proxy: Proc, method: str, path: str, body: bytes | None, status: int
) -> None:
    r = httpx.request(method, proxy.url + path, content=body)
    assert r.status_code == status
    assert "message" in r.json()["error"]


def test_bad_priority_header(proxy: Proc) -> None:
    r = httpx.post(
        proxy.url + "/v1/completions", headers={"x-priority": "urgent!"},
        content=b'{"model":"emu","prompt":"x","max_tokens":1}',
    )  # fmt: skip
    assert r.status_code == 400 and "x-priority" in r.json()["error"]["message"]


def test_health_ready_metrics(proxy: Proc) -> None:
    assert http_get(proxy.url + "/health")[0] == 200
    status, body = http_get(proxy.url + "/ready")
    assert status == 200 and orjson.loads(body)["status"] == "ready"
    text = proxy.metrics_text()
    assert metric_value(text, "rightsizer_backend_up") == 2.0


def _send_concurrently(proxy: Proc, n: int, concurrency: int) -> list[object]:
    async def one(c: openai.AsyncOpenAI, i: int, sem: asyncio.Semaphore) -> object:
        async with sem:
            try:
                if i % 2:
                    s = await c.chat.completions.create(
                        model="emu", messages=[{"role": "user", "content": f"q{i} " * (i % 50)}],
                        max_tokens=8 + i % 16, stream=True,
                    )  # fmt: skip
                    return sum([1 async for ch in s if ch.choices and ch.choices[0].delta.content])
                r = await c.completions.create(model="emu", prompt=f"p{i}", max_tokens=8 + i % 16)
                return r.usage.completion_tokens if r.usage else None
            except openai.APIError as exc:
                return exc

    async def main() -> list[object]:
        sem = asyncio.Semaphore(concurrency)
        url = proxy.url + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as c:
            return list(await asyncio.gather(*(one(c, i, sem) for i in range(n))))

    return asyncio.run(main())


def test_bounded_load_nothing_lost_or_double_counted(proxy: Proc, emus: tuple[Proc, Proc]) -> None:
    before = proxy.metrics_text()
    emu_before = sum(metric_value(e.metrics_text(), "vllm:generation_tokens_total") for e in emus)
    results = _send_concurrently(proxy, 200, 32)
    assert results == [8 + i % 16 for i in range(200)], "every request completes with its tokens"
    after = proxy.metrics_text()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("rightsizer_requests_total", outcome="ok") == 200
    expected_tokens = sum(8 + i % 16 for i in range(200))
    assert delta("rightsizer_completion_tokens_total") == expected_tokens
    emu_after = sum(metric_value(e.metrics_text(), "vllm:generation_tokens_total") for e in emus)
    assert emu_after - emu_before == expected_tokens, "proxy and engines agree exactly"
    per_backend = [delta("rightsizer_requests_total", backend=e.url.split("//")[1]) for e in emus]
    assert sum(per_backend) == 200 and min(per_backend) > 40, per_backend


def test_backend_down_before_dispatch_is_retried_elsewhere(tmp_path: Path) -> None:
    a, b = start_emulator("emu"), start_emulator("emu")
    log = tmp_path / "r.jsonl"
    p = start_proxy([a.url, b.url], request_log=log,
                    config={"health": {"interval_s": 30.0, "scrape_interval_s": 0}})  # fmt: skip
    try:
        a.kill()  # the proxy still believes a is healthy (next check in 30 s)
        c = client(p)
        for _ in range(4):
            r = c.completions.create(model="emu", prompt="x", max_tokens=2)
            assert r.usage is not None and r.usage.completion_tokens == 2
        recs = read_records(log)
        wait_for(lambda: len(read_records(log)) == 4)
        recs = read_records(log)
        assert all(r["outcome"] == "ok" for r in recs)
        assert any(r["attempts"] == 2 for r in recs), "at least one went to the dead backend first"
        assert metric_value(p.metrics_text(), "rightsizer_upstream_retries_total") >= 1
    finally:
        for proc in (p, a, b):
            proc.stop()


def test_backend_killed_mid_stream_ends_with_error_event(tmp_path: Path) -> None:
    a = start_emulator("emu", itl=0.05)
    log = tmp_path / "r.jsonl"
    p = start_proxy([a.url], request_log=log)
    try:
        stream = client(p).completions.create(model="emu", prompt="x", max_tokens=200, stream=True)
        got = 0
        with pytest.raises(openai.APIError) as info:
            for _chunk in stream:
                got += 1
                if got == 3:
                    a.kill()
        assert "mid-stream" in str(info.value)
        wait_for(lambda: len(read_records(log)) == 1)
        (rec,) = read_records(log)
        assert rec["outcome"] == "upstream_error" and rec["first_token_s"] is not None
    finally:
        p.stop()
        a.stop()


def test_client_disconnect_cancels_upstream(tmp_path: Path) -> None:
    a = start_emulator("emu", itl=0.05)
    log = tmp_path / "r.jsonl"
    p = start_proxy([a.url], request_log=log)
    try:
        body = b'{"model":"emu","prompt":"x","max_tokens":2000,"stream":true}'
        sock = socket.create_connection(("127.0.0.1", int(p.url.rsplit(":", 1)[1])))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        sock.recv(4096)  # headers and the first events arrived
        running = lambda: metric_value(a.metrics_text(), "vllm:num_requests_running")  # noqa: E731
        assert running() == 1
        sock.close()
        wait_for(lambda: running() == 0, timeout_s=5)
        wait_for(lambda: len(read_records(log)) == 1)
        (rec,) = read_records(log)
        assert rec["outcome"] == "client_cancelled"
        assert metric_value(a.metrics_text(), "vllm:generation_tokens_total") < 2000
    finally:
        p.stop()
        a.stop()


def test_slow_backend_times_out_with_504(tmp_path: Path) -> None:
    a = start_emulator("emu", ttft=3.0)
    p = start_proxy([a.url], config={"timeouts": {"read_s": 0.5}})
    try:
        t0 = time.monotonic()
        r = httpx.post(
            p.url + "/v1/completions",
            content=b'{"model":"emu","prompt":"x","max_tokens":2}',
            timeout=10,
        )
        assert r.status_code == 504 and r.json()["error"]["type"] == "upstream_timeout"
        # the backend's read limit, named as such (not the proxy's total limit)
        assert "did not answer within 0.5s" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 2.5
        # a stream that started (headers sent) ends with an SSE error event instead
        with httpx.stream("POST", p.url + "/v1/completions", timeout=10,
                          content=b'{"model":"emu","prompt":"x","max_tokens":2,"stream":true}') as s:  # fmt: skip
            events = [line for line in s.iter_lines() if line.startswith("data:")]
        err = orjson.loads(events[-1][5:])["error"]
        assert err["type"] == "upstream_timeout" and "sent nothing" in err["message"]
    finally:
        p.stop()
        a.stop()


def test_no_healthy_backend_is_503_with_retry_after(tmp_path: Path) -> None:
    a = start_emulator("emu")
    p = start_proxy([a.url], config={"health": {"interval_s": 0.2, "unhealthy_after": 1}})
    try:
        a.kill()
        wait_for(lambda: http_get(p.url + "/ready")[0] == 503, timeout_s=5)
        r = httpx.post(p.url + "/v1/completions", content=b'{"model":"emu","prompt":"x"}')
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.headers["x-rightsizer-shed-reason"] == "no_backend"
    finally:
        p.stop()


def _raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no HTTP client would send a malformed request) and read the
    reply up to the server's close."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


def test_admin_token_and_header_limits(emus: tuple[Proc, Proc]) -> None:
    p = start_proxy([emus[0].url], env={"RIGHTSIZER_SERVER__ADMIN_TOKEN": "s3cret"},
                    config={"server": {"max_header_bytes": 2048, "max_headers": 20}})  # fmt: skip
    try:
        r = httpx.get(p.url + "/admin/estimator")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(p.url + "/admin/estimator", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code in (200, 503)  # 503 until the estimator's first refresh
        assert "s3cret" not in p.metrics_text()
        body = b'{"model":"emu","prompt":"x","max_tokens":1}'
        r = httpx.post(p.url + "/v1/completions", headers={"x-big": "a" * 4096}, content=body)
        assert r.status_code == 431, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert "server.max_header_bytes" in err["message"]
        many = {f"x-h{i}": "v" for i in range(30)}
        r = httpx.post(p.url + "/v1/completions", headers=many, content=body)
        assert r.status_code == 431 and "server.max_headers" in r.json()["error"]["message"]
        # what aiohttp's parser rejects before the app sees it: the same JSON errors
        for raw, status, words in [
            (b"POST /v1/completions HTTP/1.1\r\nHost x\r\n\r\n", 400, "Invalid header token"),
            (b"GARBAGE\r\n\r\n", 400, "Invalid method"),
            (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ab\r\n\r\n", 400,
             "Content-Length"),
            (b"GET /" + b"a" * 4096 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "request line"),
        ]:  # fmt: skip
            got, headers, reply = _raw_exchange(p.url, raw)
            assert got == status and headers["content-type"].startswith("application/json"), reply
            err = orjson.loads(reply)["error"]
            assert err["type"] == "invalid_request_error" and words in err["message"], err
        r = httpx.post(p.url + "/v1/completions", content=body)  # the proxy still serves
        assert r.status_code == 200
    finally:
        p.stop()


def test_other_v1_paths_are_forwarded_and_measured(proxy: Proc) -> None:
    r = client(proxy).embeddings.create(model="emu", input=["hello world", "bye"],
                                        extra_headers={"x-request-id": "emb-1"})  # fmt: skip
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8
    (rec,) = records_for(proxy, "emb-1")
    assert rec["endpoint"] == "embeddings" and rec["outcome"] == "ok" and rec["prompt_tokens"] == 3
    missing = httpx.post(proxy.url + "/v1/rerank", content=b'{"model":"emu"}')
    assert missing.status_code == 404  # the backend's own 4xx, passed through
