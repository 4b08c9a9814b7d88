"""vLLM: V1 names (``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries_total``, ...) and
the older V0 names (``vllm:gpu_cache_usage_perc``, ``vllm:gpu_prefix_cache_*``);
``vllm:cache_config_info`` labels give ``block_size``, ``num_gpu_blocks`` and, where present,
``max_num_seqs``."""

from __future__ import annotations

from typing import Any

from proxy.upstream.dialects._helpers import Dialect, Samples, int_label, mean, register, total


def parse(s: Samples) -> dict[str, Any]:
    return {
        "running": total(s, "vllm:num_requests_running"),
        "waiting": total(s, "vllm:num_requests_waiting"),
        "kv_usage": mean(s, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "prefix_cache_queries": total(
            s, "vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"
        ),
        "prefix_cache_hits": total(
            s, "vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"
        ),
        "prefix_cache_hit_rate": mean(s, "vllm:gpu_prefix_cache_hit_rate"),
        "preemptions": total(s, "vllm:num_preemptions_total"),
        "prompt_tokens_total": total(s, "vllm:prompt_tokens_total"),
        "generation_tokens_total": total(s, "vllm:generation_tokens_total"),
        "requests_total": total(s, "vllm:request_success_total"),
        "block_size": int_label(s, "vllm:cache_config_info", "block_size"),
        "num_gpu_blocks": int_label(s, "vllm:cache_config_info", "num_gpu_blocks"),
        "max_num_seqs": int_label(s, "vllm:cache_config_info", "max_num_seqs"),
    }


DIALECT = register(Dialect("vllm", "vllm:", parse))
