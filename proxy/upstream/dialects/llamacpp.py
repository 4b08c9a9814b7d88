"""llama.cpp's ``llama-server --metrics``: ``llamacpp:requests_processing`` /
``requests_deferred``, token counters, ``prompt_tokens_cached_total``."""

from __future__ import annotations

from typing import Any

from proxy.upstream.dialects._helpers import Dialect, Samples, mean, register, total


def parse(s: Samples) -> dict[str, Any]:
    return {
        "running": total(s, "llamacpp:requests_processing"),
        "waiting": total(s, "llamacpp:requests_deferred"),
        "kv_usage": mean(s, "llamacpp:kv_cache_usage_ratio"),
        "prompt_tokens_total": total(s, "llamacpp:prompt_tokens_total"),
        "generation_tokens_total": total(s, "llamacpp:tokens_predicted_total"),
        "prefix_cache_hits": total(s, "llamacpp:prompt_tokens_cached_total"),
    }


DIALECT = register(Dialect("llamacpp", "llamacpp:", parse))
