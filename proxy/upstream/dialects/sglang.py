"""SGLang: ``sglang:num_running_reqs``, ``num_queue_reqs``, ``token_usage``,
``cache_hit_rate`` (a rate, not counters)."""

from __future__ import annotations

from typing import Any

from proxy.upstream.dialects._helpers import Dialect, Samples, mean, register, total


def parse(s: Samples) -> dict[str, Any]:
    return {
        "running": total(s, "sglang:num_running_reqs"),
        "waiting": total(s, "sglang:num_queue_reqs"),
        "kv_usage": mean(s, "sglang:token_usage"),
        "prefix_cache_hit_rate": mean(s, "sglang:cache_hit_rate"),
        "prompt_tokens_total": total(s, "sglang:prompt_tokens_total"),
        "generation_tokens_total": total(s, "sglang:generation_tokens_total"),
        "requests_total": total(s, "sglang:num_requests_total"),
    }


DIALECT = register(Dialect("sglang", "sglang:", parse))
