"""Text Generation Inference: ``tgi_batch_current_size``, ``tgi_queue_size``, request
histograms (their sums are the token counters)."""

from __future__ import annotations

from typing import Any

from proxy.upstream.dialects._helpers import Dialect, Samples, register, total


def parse(s: Samples) -> dict[str, Any]:
    return {
        "running": total(s, "tgi_batch_current_size"),
        "waiting": total(s, "tgi_queue_size"),
        "prompt_tokens_total": total(s, "tgi_request_input_length_sum"),
        "generation_tokens_total": total(s, "tgi_request_generated_tokens_sum"),
        "requests_total": total(s, "tgi_request_success_total", "tgi_request_success"),
    }


DIALECT = register(Dialect("tgi", "tgi_", parse))
