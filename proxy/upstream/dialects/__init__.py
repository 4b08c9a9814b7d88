"""One small parser per engine's ``/metrics`` dialect, turning exposition text into the fields
of a ``BackendSnapshot``.

Each dialect is one module here that registers a ``Dialect`` (a metric-name prefix that
detects it, and a parser); a new engine is one new file plus one import line below. Samples of
one metric across label sets (several engines, several models) are summed; ratios are
averaged (``_helpers``). Detection (``auto``) takes the first registered prefix that any
sample name starts with.
"""

from __future__ import annotations

from proxy.upstream.dialects import llamacpp, sglang, tgi, vllm  # noqa: F401  (registers)
from proxy.upstream.dialects._helpers import DIALECTS, Dialect, Samples, parse_samples

__all__ = ["DIALECTS", "Dialect", "Samples", "detect", "parse_metrics", "parse_samples"]


def detect(samples: Samples) -> str | None:
    for name in samples:
        for dialect in DIALECTS.values():
            if name.startswith(dialect.prefix):
                return dialect.name
    return None


def parse_metrics(text: str, dialect: str = "auto") -> tuple[str | None, dict[str, object]]:
    """(dialect, snapshot fields) from exposition text; unknown dialects give no fields.
    Raises ValueError on malformed exposition text."""
    samples = parse_samples(text)
    found = detect(samples) if dialect == "auto" else dialect
    d = DIALECTS.get(found or "")
    if d is None:
        return found, {}
    return found, {k: v for k, v in d.parse(samples).items() if v is not None}
