"""One small parser per engine's ``/metrics`` dialect, turning exposition text into the fields
of a ``BackendSnapshot``.

Dialects (auto-detected by metric-name prefix):
- ``vllm``: V1 names (``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries_total``, ...)
  and the older V0 names (``vllm:gpu_cache_usage_perc``, ``vllm:gpu_prefix_cache_*``).
  ``vllm:cache_config_info`` labels give ``block_size`` and ``num_gpu_blocks``.
- ``llamacpp``: ``llamacpp:requests_processing`` / ``requests_deferred`` / token counters.
- ``sglang``: ``sglang:num_running_reqs``, ``num_queue_reqs``, ``token_usage``, ``cache_hit_rate``.
- ``tgi``: ``tgi_batch_current_size``, ``tgi_queue_size``, request histograms.
Samples of one metric across label sets (several engines, several models) are summed; ratios
are averaged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_samples(text: str) -> Samples:
    """Sample name -> [(labels, value)]. Raises ValueError on malformed exposition text."""
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def detect(samples: Samples) -> str | None:
    for name in samples:
        for prefix, dialect in _PREFIXES:
            if name.startswith(prefix):
                return dialect
    return None


def _sum(samples: Samples, *names: str) -> float | None:
    for name in names:
        rows = samples.get(name)
        if rows:
            return sum(v for _, v in rows)
    return None


def _mean(samples: Samples, *names: str) -> float | None:
    for name in names:
        rows = samples.get(name)
        if rows:
            return sum(v for _, v in rows) / len(rows)
    return None


def _int_label(samples: Samples, name: str, label: str) -> int | None:
    for labels, _ in samples.get(name, ()):
        raw = labels.get(label)
        if raw not in (None, "", "None"):
            try:
                return int(float(raw))
            except ValueError:
                return None
    return None


def _vllm(s: Samples) -> dict[str, Any]:
    return {
        "running": _sum(s, "vllm:num_requests_running"),
        "waiting": _sum(s, "vllm:num_requests_waiting"),
        "kv_usage": _mean(s, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "prefix_cache_queries": _sum(
            s, "vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"
        ),
        "prefix_cache_hits": _sum(
            s, "vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"
        ),
        "prefix_cache_hit_rate": _mean(s, "vllm:gpu_prefix_cache_hit_rate"),
        "preemptions": _sum(s, "vllm:num_preemptions_total"),
        "prompt_tokens_total": _sum(s, "vllm:prompt_tokens_total"),
        "generation_tokens_total": _sum(s, "vllm:generation_tokens_total"),
        "requests_total": _sum(s, "vllm:request_success_total"),
        "block_size": _int_label(s, "vllm:cache_config_info", "block_size"),
        "num_gpu_blocks": _int_label(s, "vllm:cache_config_info", "num_gpu_blocks"),
        "max_num_seqs": _int_label(s, "vllm:cache_config_info", "max_num_seqs"),
    }


def _llamacpp(s: Samples) -> dict[str, Any]:
    return {
        "running": _sum(s, "llamacpp:requests_processing"),
        "waiting": _sum(s, "llamacpp:requests_deferred"),
        "kv_usage": _mean(s, "llamacpp:kv_cache_usage_ratio"),
        "prompt_tokens_total": _sum(s, "llamacpp:prompt_tokens_total"),
        "generation_tokens_total": _sum(s, "llamacpp:tokens_predicted_total"),
        "prefix_cache_hits": _sum(s, "llamacpp:prompt_tokens_cached_total"),
    }


def _sglang(s: Samples) -> dict[str, Any]:
    return {
        "running": _sum(s, "sglang:num_running_reqs"),
        "waiting": _sum(s, "sglang:num_queue_reqs"),
        "kv_usage": _mean(s, "sglang:token_usage"),
        "prefix_cache_hit_rate": _mean(s, "sglang:cache_hit_rate"),
        "prompt_tokens_total": _sum(s, "sglang:prompt_tokens_total"),
        "generation_tokens_total": _sum(s, "sglang:generation_tokens_total"),
        "requests_total": _sum(s, "sglang:num_requests_total"),
    }


def _tgi(s: Samples) -> dict[str, Any]:
    return {
        "running": _sum(s, "tgi_batch_current_size"),
        "waiting": _sum(s, "tgi_queue_size"),
        "prompt_tokens_total": _sum(s, "tgi_request_input_length_sum"),
        "generation_tokens_total": _sum(s, "tgi_request_generated_tokens_sum"),
        "requests_total": _sum(s, "tgi_request_success_total", "tgi_request_success"),
    }


_PREFIXES = (("vllm:", "vllm"), ("llamacpp:", "llamacpp"), ("sglang:", "sglang"), ("tgi_", "tgi"))
PARSERS: dict[str, Callable[[Samples], dict[str, Any]]] = {
    "vllm": _vllm,
    "llamacpp": _llamacpp,
    "sglang": _sglang,
    "tgi": _tgi,
}


def parse_metrics(text: str, dialect: str = "auto") -> tuple[str | None, dict[str, Any]]:
    """(dialect, snapshot fields) from exposition text; unknown dialects give no fields."""
    samples = parse_samples(text)
    found = detect(samples) if dialect == "auto" else dialect
    parser = PARSERS.get(found or "")
    if parser is None:
        return found, {}
    return found, {k: v for k, v in parser(samples).items() if v is not None}
