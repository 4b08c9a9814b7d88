"""The proxy in front of a real vLLM (CPU build) and a real llama-server, each serving a tiny
model made locally, driven by the real openai SDK. What the client gets through the proxy
must equal what it gets directly, and the proxy's token counts must equal the engine's own
counters exactly."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.procs import Proc, metric_value, read_records, start_proxy, wait_for
from tests.support.real_backends import RunningServer, start_llama_server

pytestmark = pytest.mark.integration

# Counter names per engine: (prompt tokens, generated tokens, running requests)
COUNTERS = {
    "vllm": (
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_requests_running",
    ),
    "llamacpp": (
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:requests_processing",
    ),
}


def extra_body(server: RunningServer) -> dict[str, object]:
    # exact lengths (random weights hit EOS at random); llama-server: no prompt cache, so
    # its prompt-token counter counts every prompt token like the usage does
    body: dict[str, object] = {"ignore_eos": True}
    if server.kind == "llamacpp":
        body["cache_prompt"] = False
    return body


@pytest.fixture(scope="module", params=["vllm_server", "llama_server"])
def backend(request: pytest.FixtureRequest) -> RunningServer:
    server: RunningServer = request.getfixturevalue(request.param)
    return server


@pytest.fixture(scope="module")
def proxy(backend: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    p = start_proxy([backend.url], request_log=log, config={"health": {"scrape_interval_s": 1.0}})
    p.extra["log"] = log
    yield p
    p.stop()


def engine_totals(server: RunningServer) -> tuple[float, float]:
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
    prompt, gen, _ = COUNTERS[server.kind]
    return metric_value(text, prompt), metric_value(text, gen)


def proxy_totals(proxy: Proc) -> tuple[float, float]:
    text = proxy.metrics_text()
    return (metric_value(text, "rightsizer_prompt_tokens_total"),
            metric_value(text, "rightsizer_completion_tokens_total"))  # fmt: skip


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Count: one two three"},
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_same_as_direct(backend: RunningServer, proxy: Proc, stream: bool) -> None:
    def ask(url: str) -> tuple[str, tuple[int, int] | None]:
        kw = {"model": backend.model, "messages": MESSAGES, "max_tokens": 24, "temperature": 0.0,
              "extra_body": extra_body(backend)}  # fmt: skip
        if not stream:
            r = sdk(url).chat.completions.create(**kw)  # type: ignore[call-overload]
            u = r.usage
            return r.choices[0].message.content or "", (u.prompt_tokens, u.completion_tokens)
        chunks = list(
            sdk(url).chat.completions.create(
                **kw, stream=True, stream_options={"include_usage": True}
            )
        )  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        u = chunks[-1].usage
        return text, (u.prompt_tokens, u.completion_tokens) if u else None

    direct, via = ask(backend.url), ask(proxy.url)
    assert via == direct
    assert via[1] is not None and via[1][1] == 24


def test_completion_stream_same_as_direct_async(backend: RunningServer, proxy: Proc) -> None:
    async def ask(url: str) -> str:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
            s = await c.completions.create(model=backend.model, prompt="def main():", max_tokens=16,
                                           temperature=0.0, stream=True, extra_body=extra_body(backend))  # fmt: skip
            return "".join([ch.choices[0].text async for ch in s if ch.choices])

    assert asyncio.run(ask(proxy.url)) == asyncio.run(ask(backend.url))


def test_load_counts_agree_exactly_with_engine(backend: RunningServer, proxy: Proc) -> None:
    """200 requests, 32 concurrent, mixed streaming: every one completes, no token lost or
    double-counted: the proxy's totals move exactly as much as the engine's own counters."""
    e0, p0 = engine_totals(backend), proxy_totals(proxy)

    async def one(c: openai.AsyncOpenAI, i: int, sem: asyncio.Semaphore) -> int:
        n = 4 + i % 13
        async with sem:
            if i % 2:
                s = await c.chat.completions.create(
                    model=backend.model, messages=[{"role": "user", "content": f"q{i} " * (1 + i % 7)}],
                    max_tokens=n, stream=True, extra_body=extra_body(backend),
                )  # fmt: skip
                return len([ch async for ch in s])
            r = await c.completions.create(model=backend.model, prompt=f"p{i} " * (1 + i % 5),
                                           max_tokens=n, extra_body=extra_body(backend))  # fmt: skip
            assert r.usage is not None and r.usage.completion_tokens == n
            return n

    async def main() -> list[int]:
        sem = asyncio.Semaphore(32)
        url = proxy.url + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=300) as c:
            return list(await asyncio.gather(*(one(c, i, sem) for i in range(200))))

    results = asyncio.run(main())
    assert len(results) == 200 and all(r > 0 for r in results)
    e1, p1 = engine_totals(backend), proxy_totals(proxy)
    assert p1[1] - p0[1] == sum(4 + i % 13 for i in range(200))
    assert p1[1] - p0[1] == e1[1] - e0[1], "generated tokens: proxy vs engine"
    assert p1[0] - p0[0] == e1[0] - e0[0], "prompt tokens: proxy vs engine"
    text = proxy.metrics_text()
    assert metric_value(text, "rightsizer_token_counts_estimated_total") == 0


def test_records_and_scraped_snapshot(backend: RunningServer, proxy: Proc) -> None:
    sdk(proxy.url).completions.create(model=backend.model, prompt="hello", max_tokens=3,
                                      extra_headers={"x-request-id": f"rec-{backend.kind}"})  # fmt: skip
    log = proxy.extra["log"]
    assert isinstance(log, Path)
    wait_for(lambda: any(r["request_id"] == f"rec-{backend.kind}" for r in read_records(log)))
    (rec,) = [r for r in read_records(log) if r["request_id"] == f"rec-{backend.kind}"]
    assert rec["outcome"] == "ok" and rec["backend"] == backend.url.split("//")[1]
    assert isinstance(rec["prompt_tokens"], int) and rec["prompt_tokens"] > 0
    # the scraper read the engine's dialect: engine gauges appear for this backend
    wait_for(lambda: "rightsizer_engine_running_requests{" in proxy.metrics_text(), timeout_s=10)


def test_client_disconnect_stops_generation(
    backend: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    running_name = COUNTERS[backend.kind][2]

    def running() -> float:
        import urllib.request

        return metric_value(
            urllib.request.urlopen(backend.url + "/metrics", timeout=5).read().decode(),
            running_name,
        )

    def disconnect_once() -> tuple[float, str]:
        """Tokens the engine generated for a client that left after the first bytes, through
        a proxy of its own, and that proxy's record of the request."""
        log = tmp_path_factory.mktemp("disconnect") / "requests.jsonl"
        proxy = start_proxy([backend.url], request_log=log)
        try:
            _, gen0 = engine_totals(backend)
            body = (b'{"model":"' + backend.model.encode() + b'","prompt":"x","max_tokens":1800,'
                    b'"ignore_eos":true,"stream":true}')  # fmt: skip
            sock = socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
            sock.recv(65536)
            sock.close()
            wait_for(lambda: running() == 0, timeout_s=20)
            wait_for(lambda: len(read_records(log)) == 1)
            (r,) = read_records(log)
            seen = (f"{r['outcome']}, first token after "
                    f"{(r['first_token_s'] or r['arrival_s']) - r['arrival_s']:.3f} s, ended after "
                    f"{r['end_s'] - r['arrival_s']:.3f} s, {r['completion_tokens']} tokens relayed")  # fmt: skip
            return engine_totals(backend)[1] - gen0, seen
        finally:
            proxy.stop()

    # Up to three tries, each through a fresh proxy: the engine must stop early for a
    # departed client at least once, and a proxy that never cancels fails every try. In
    # about one run of this module in ten, a try through the module's long-lived proxy saw
    # the engine generate all 1,800 tokens, and its next tries did too (root cause not
    # found; see the notes); the failure message carries the proxy's records.
    tries = [disconnect_once()]
    while tries[-1][0] >= 1800 and len(tries) < 3:
        tries.append(disconnect_once())
    assert tries[-1][0] < 1800, f"the engine kept generating for departed clients: {tries}"


def test_llama_killed_mid_stream(tmp_path: Path, require_llama: None) -> None:
    server = start_llama_server("doomed-llama")
    log = tmp_path / "r.jsonl"
    p = start_proxy([server.url], request_log=log)
    try:
        stream = sdk(p.url).completions.create(model="doomed-llama", prompt="x", max_tokens=4000,
                                               stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        with pytest.raises(openai.APIError, match="mid-stream"):
            for i, _ in enumerate(stream):
                if i == 2:
                    server.kill()
        wait_for(lambda: len(read_records(log)) == 1)
        assert read_records(log)[0]["outcome"] == "upstream_error"
    finally:
        p.stop()
        server.stop()


def test_predicted_kv_capacity_matches_vllm(vllm_server: RunningServer) -> None:
    """The memory planner's KV capacity equals what the real vLLM CPU engine allocated
    (VLLM_CPU_KVCACHE_SPACE=1 GiB in the fixture), read from its cache_config_info."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from estimator.memory import cpu_plan
    from estimator.modelarch import load_model_arch
    from tests.support.real_backends import MODELS

    text = urllib.request.urlopen(vllm_server.url + "/metrics", timeout=5).read().decode()
    info = next(s.labels for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "vllm:cache_config_info")  # fmt: skip
    block_size, blocks = int(info["block_size"]), int(info["num_gpu_blocks"])
    plan = cpu_plan(
        load_model_arch(MODELS / "tiny"), kv_cache_space_bytes=1 << 30, block_size=block_size
    )
    assert plan.num_blocks == blocks
    assert plan.kv_capacity_tokens == blocks * block_size
