"""Smoke tests straight against the real backends (no proxy), with the openai SDK.

They pin down what the proxy relies on: usage in plain and streamed responses, exact
output lengths with ``ignore_eos``, and token counters in ``/metrics``.
"""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.support.real_backends import BackendStartError, RunningServer, start_llama_server

pytestmark = pytest.mark.real_backend

IGNORE_EOS = {"ignore_eos": True}
PROMPT_TOKENS_METRIC = {
    "vllm": "vllm:prompt_tokens_total",
    "llamacpp": "llamacpp:prompt_tokens_total",
}
OUTPUT_TOKENS_METRIC = {
    "vllm": "vllm:generation_tokens_total",
    "llamacpp": "llamacpp:tokens_predicted_total",
}


@pytest.fixture(params=["vllm_server", "llama_server"], ids=["vllm", "llamacpp"])
def server(request: pytest.FixtureRequest) -> RunningServer:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def messages(text: str = "Write a haiku about queues.") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def scrape(server: RunningServer) -> dict[str, float]:
    """Every sample in /metrics, summed over labels, by sample name."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_models_lists_served_name(client: OpenAI, server: RunningServer) -> None:
    assert server.model in [model.id for model in client.models.list()]


def test_chat_completion_reports_usage(client: OpenAI, server: RunningServer) -> None:
    response = client.chat.completions.create(
        model=server.model, messages=messages(), max_tokens=8, extra_body=IGNORE_EOS
    )
    (choice,) = response.choices
    assert choice.finish_reason == "length"
    assert isinstance(choice.message.content, str)
    assert response.usage is not None
    assert response.usage.completion_tokens == 8
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8


def test_completion_reports_usage(client: OpenAI, server: RunningServer) -> None:
    response = client.completions.create(
        model=server.model, prompt="def add(a, b):", max_tokens=8, extra_body=IGNORE_EOS
    )
    (choice,) = response.choices
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str)
    assert response.usage is not None
    assert response.usage.completion_tokens == 8
    assert response.usage.prompt_tokens > 0


@pytest.mark.parametrize("max_tokens", [1, 17, 100], ids=["1", "17", "100"])
def test_ignore_eos_gives_exact_length(
    client: OpenAI, server: RunningServer, max_tokens: int
) -> None:
    response = client.completions.create(
        model=server.model, prompt="import os\n", max_tokens=max_tokens, extra_body=IGNORE_EOS
    )
    assert response.usage is not None
    assert response.usage.completion_tokens == max_tokens


def test_chat_stream_ends_with_one_usage_chunk(client: OpenAI, server: RunningServer) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=messages(),
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens > 0
    assert [c for c in chunks if c.usage is not None] == [last]
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    # Chunks are not tokens (partial UTF-8 is merged), but there is at least one.
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content_chunks) <= 24


def test_completion_stream_ends_with_usage_chunk(client: OpenAI, server: RunningServer) -> None:
    stream = client.completions.create(
        model=server.model,
        prompt="class Queue:",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert sum(1 for c in chunks if c.usage is not None) == 1


def test_metrics_count_request_tokens(client: OpenAI, server: RunningServer) -> None:
    prompt_metric = PROMPT_TOKENS_METRIC[server.kind]
    output_metric = OUTPUT_TOKENS_METRIC[server.kind]
    before = scrape(server)
    assert prompt_metric in before
    assert output_metric in before
    response = client.chat.completions.create(
        model=server.model,
        messages=messages(f"Request {uuid.uuid4()}"),  # unique: no prompt-cache reuse
        max_tokens=10,
        extra_body=IGNORE_EOS,
    )
    assert response.usage is not None
    # The server may publish counters just after the response: poll briefly.
    deadline = time.monotonic() + 10
    after = scrape(server)
    while after[output_metric] - before[output_metric] < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape(server)
    assert after[output_metric] - before[output_metric] == 10
    prompt_delta = after[prompt_metric] - before[prompt_metric]
    if server.kind == "vllm":
        assert prompt_delta == response.usage.prompt_tokens
    else:
        # llama-server counts only the prompt tokens it evaluated; a slot that served
        # the same chat-template prefix before may reuse it.
        assert 0 < prompt_delta <= response.usage.prompt_tokens


def test_vllm_metrics_expose_scheduler_gauges(vllm_server: RunningServer) -> None:
    samples = scrape(vllm_server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert samples[name] == 0
    kv_usage = samples.get("vllm:kv_cache_usage_perc", samples.get("vllm:gpu_cache_usage_perc"))
    assert kv_usage is not None
    assert 0 <= kv_usage <= 1


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.usefixtures("require_llama")
def test_stop_ends_the_server() -> None:
    server = start_llama_server("stop-me", slots=1, ctx=512)
    server.stop()
    assert server.proc.returncode is not None
    assert _refuses_connections(server.url)


@pytest.mark.usefixtures("require_llama")
def test_kill_ends_the_server_at_once() -> None:
    with start_llama_server("kill-me", slots=1, ctx=512) as server:
        server.kill()
        assert server.proc.returncode == -9
        assert _refuses_connections(server.url)


@pytest.mark.usefixtures("require_llama")
def test_start_failure_raises_with_the_log(llama_server: RunningServer) -> None:
    taken_port = int(llama_server.url.rsplit(":", 1)[1])
    with pytest.raises(BackendStartError, match="exited") as info:
        start_llama_server("clash", slots=1, ctx=512, port=taken_port, timeout_s=20)
    assert "llama-server" in str(info.value)
