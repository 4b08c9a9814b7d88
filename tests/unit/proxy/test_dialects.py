"""Metrics-dialect parsing. vLLM and llama.cpp text below is shaped like what the real servers
expose (their real /metrics are also checked in the integration tests); SGLang and TGI can't
run on these machines, so their samples are written from their documentation."""

from __future__ import annotations

import pytest

from proxy.upstream.dialects import parse_metrics

VLLM_V1 = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 400.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 1.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 5000.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 7000.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 5.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="4096"} 1.0
"""

VLLM_V0 = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.3
"""

LLAMACPP = """\
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 120
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 300
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""

SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 4.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 6.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.7
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="m"} 0.45
# TYPE sglang:prompt_tokens counter
sglang:prompt_tokens_total{model_name="m"} 900.0
"""

TGI = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 8
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="+Inf"} 2
tgi_request_input_length_sum 640
tgi_request_input_length_count 2
"""


@pytest.mark.parametrize(
    ("text", "dialect", "expected"),
    [
        (VLLM_V1, "vllm", {"running": 3, "waiting": 2, "kv_usage": 0.25, "prefix_cache_queries": 1000,
                           "prefix_cache_hits": 400, "preemptions": 1, "prompt_tokens_total": 5000,
                           "generation_tokens_total": 7000, "requests_total": 15, "block_size": 16,
                           "num_gpu_blocks": 4096}),
        (VLLM_V0, "vllm", {"running": 1, "kv_usage": 0.5, "prefix_cache_hit_rate": 0.3}),
        (LLAMACPP, "llamacpp", {"running": 2, "waiting": 1, "prompt_tokens_total": 120,
                                "generation_tokens_total": 300}),
        (SGLANG, "sglang", {"running": 4, "waiting": 6, "kv_usage": 0.7, "prefix_cache_hit_rate": 0.45,
                            "prompt_tokens_total": 900}),
        (TGI, "tgi", {"running": 8, "waiting": 3, "prompt_tokens_total": 640}),
    ],
    ids=["vllm-v1", "vllm-v0", "llamacpp", "sglang", "tgi"],
)  # fmt: skip
def test_dialects_detected_and_parsed(text: str, dialect: str, expected: dict[str, float]) -> None:
    found, fields = parse_metrics(text)
    assert found == dialect
    assert fields == expected


def test_unknown_dialect_gives_nothing() -> None:
    assert parse_metrics("# TYPE foo gauge\nfoo 1\n") == (None, {})


def test_malformed_text_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_metrics("vllm:num_requests_running{engine=0 1\n")
