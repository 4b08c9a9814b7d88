from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from estimator.records import ItlSummary, Outcome, RequestRecord
from proxy.telemetry import ITL_BUCKETS, BulkHistogram, Metrics, TenantLabels


def test_bulk_histogram_matches_prometheus_histogram() -> None:
    values = [0.0005, 0.001, 0.0011, 0.02, 0.05, 0.3, 7.0, 0.001]
    reg = CollectorRegistry()
    bulk = BulkHistogram("bulk_seconds", "x", ["m"], ITL_BUCKETS)
    reg.register(bulk)
    ref = Histogram("ref_seconds", "x", ["m"], buckets=ITL_BUCKETS, registry=reg)
    bulk.observe_many(("a",), values[:3])
    bulk.observe_many(("a",), values[3:])
    for v in values:
        ref.labels("a").observe(v)
    for le in [*map(str, ITL_BUCKETS), "+Inf"]:
        assert reg.get_sample_value(
            "bulk_seconds_bucket", {"m": "a", "le": le}
        ) == reg.get_sample_value("ref_seconds_bucket", {"m": "a", "le": le}), le
    assert reg.get_sample_value("bulk_seconds_sum", {"m": "a"}) == pytest.approx(sum(values))
    assert reg.get_sample_value("bulk_seconds_count", {"m": "a"}) == len(values)


def test_tenant_labels_are_capped() -> None:
    cap = TenantLabels(2)
    assert [cap(t) for t in ["a", "b", "c", "a", "d"]] == ["a", "b", "other", "a", "other"]


def test_record_updates_every_family() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, max_tenants=5)
    rec = RequestRecord(
        request_id="r", model="m", backend="b", tenant="t", streamed=True, arrival_s=1.0,
        dispatch_s=1.01, first_token_s=1.2, end_s=2.0, prompt_tokens=10, completion_tokens=5,
        cached_tokens=4, itl=ItlSummary.from_gaps([0.1] * 4),
    )  # fmt: skip
    m.record(rec, [0.1] * 4)
    labels = {"model": "m", "backend": "b"}
    assert (
        reg.get_sample_value(
            "rightsizer_requests_total",
            {**labels, "tenant": "t", "priority": "normal", "outcome": "ok"},
        )
        == 1
    )
    assert reg.get_sample_value(
        "rightsizer_time_to_first_token_seconds_sum", labels
    ) == pytest.approx(0.2)
    assert reg.get_sample_value("rightsizer_inter_token_latency_seconds_count", labels) == 4
    assert reg.get_sample_value("rightsizer_prompt_tokens_total", {**labels, "tenant": "t"}) == 10
    assert (
        reg.get_sample_value("rightsizer_completion_tokens_total", {**labels, "tenant": "t"}) == 5
    )
    assert reg.get_sample_value("rightsizer_cached_prompt_tokens_total", labels) == 4
    assert (
        reg.get_sample_value(
            "rightsizer_queue_wait_seconds_count", {"model": "m", "priority": "normal"}
        )
        == 1
    )


def test_failed_requests_count_but_add_no_tokens() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.record(
        RequestRecord(
            request_id="r", model="m", outcome=Outcome.UPSTREAM_ERROR, prompt_tokens=3, end_s=1.0
        )
    )
    assert (
        reg.get_sample_value(
            "rightsizer_requests_total",
            {
                "model": "m",
                "backend": "none",
                "tenant": "default",
                "priority": "normal",
                "outcome": "upstream_error",
            },
        )
        == 1
    )
    assert (
        reg.get_sample_value(
            "rightsizer_prompt_tokens_total", {"model": "m", "backend": "none", "tenant": "default"}
        )
        is None
    )


def test_itl_summary() -> None:
    s = ItlSummary.from_gaps([0.4, 0.1, 0.2, 0.3])
    assert (s.count, s.mean, s.p50, s.max) == (4, pytest.approx(0.25), pytest.approx(0.25), 0.4)
    assert ItlSummary.from_gaps([]) == ItlSummary()
