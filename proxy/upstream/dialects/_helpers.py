"""The dialect registry and the helpers every dialect parser uses."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    prefix: str  # metric-name prefix that identifies the engine
    parse: Callable[[Samples], dict[str, Any]]  # samples -> BackendSnapshot fields


DIALECTS: dict[str, Dialect] = {}


def register(d: Dialect) -> Dialect:
    DIALECTS[d.name] = d
    return d


def parse_samples(text: str) -> Samples:
    """Sample name -> [(labels, value)]. Raises ValueError on malformed exposition text."""
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, *names: str) -> float | None:
    """The first of ``names`` present, summed over its label sets."""
    for name in names:
        rows = samples.get(name)
        if rows:
            return sum(v for _, v in rows)
    return None


def mean(samples: Samples, *names: str) -> float | None:
    """The first of ``names`` present, averaged over its label sets."""
    for name in names:
        rows = samples.get(name)
        if rows:
            return sum(v for _, v in rows) / len(rows)
    return None


def int_label(samples: Samples, name: str, label: str) -> int | None:
    """An integer carried as a label value (``vllm:cache_config_info{block_size="16"}``)."""
    for labels, _ in samples.get(name, ()):
        raw = labels.get(label)
        if raw not in (None, "", "None"):
            try:
                return int(float(raw))
            except ValueError:
                return None
    return None
