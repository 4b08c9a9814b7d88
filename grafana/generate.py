"""Generates the four Grafana dashboards in ``grafana/dashboards/`` (run from the repo root:
``python3 grafana/generate.py``). The JSON files are committed; a test checks they match this
script and that every query names only metrics and labels the proxy exports.

Every dashboard: a ``${datasource}`` variable (any Prometheus), ``model`` / ``backend`` /
``tenant`` / ``priority`` multi-value variables (All = ``.*``), schemaVersion 39.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
M = 'model=~"$model"'
B = 'backend=~"$backend"'
T = 'tenant=~"$tenant"'
P = 'priority=~"$priority"'
REQ = f"rightsizer_requests_total{{{M},{B},{T},{P}}}"
REQ_BY_MODEL = f"rightsizer_requests_total{{{M}}}"
ERR = f'rightsizer_requests_total{{{M},{B},{T},{P},outcome=~"upstream_error|timeout"}}'
GPU_USED = "rightsizer_gpu_memory_used_bytes"


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title: str) -> None:
        self.x, self.y = 0, self.y + self.row_h
        self.row_h = 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(pairs)]


def timeseries(title: str, desc: str, tgts: list[dict[str, Any]], unit: str = "short",
               **defaults: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "targets": tgts,
        "fieldConfig": {"defaults": {"unit": unit, **defaults,
                                     "custom": {"lineWidth": 1, "fillOpacity": 10}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }  # fmt: skip


def stat(title: str, desc: str, tgts: list[dict[str, Any]], unit: str = "short",
         thresholds: list[tuple[str, float | None]] | None = None, no_value: str = "",
         kind: str = "stat") -> dict[str, Any]:  # fmt: skip
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    return {
        "type": kind, "title": title, "description": desc, "datasource": DS, "targets": tgts,
        "fieldConfig": {"defaults": {"unit": unit, "noValue": no_value,
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }  # fmt: skip


def heatmap(title: str, desc: str, expr: str, unit: str) -> dict[str, Any]:
    return {
        "type": "heatmap", "title": title, "description": desc, "datasource": DS,
        "targets": [target(expr, "{{le}}", format="heatmap")],
        "options": {"calculate": False, "yAxis": {"unit": unit},
                    "color": {"mode": "scheme", "scheme": "Oranges"},
                    "cellGap": 1, "tooltip": {"show": True, "yHistogram": True}},
        "fieldConfig": {"defaults": {}, "overrides": []},
    }  # fmt: skip


def quantiles(metric: str, sel: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99),
              legend_prefix: str = "") -> list[dict[str, Any]]:  # fmt: skip
    grp = f"le, {by}" if by else "le"
    lp = legend_prefix + (
        " ".join(f"{{{{{b.strip()}}}}}" for b in by.split(",")) + " " if by else ""
    )
    rate = f"rate({metric}_bucket{{{sel}}}[{RI}])"
    return targets(*[(f"histogram_quantile({q}, sum by ({grp}) ({rate}))",
                      f"{lp}p{round(q * 100)}") for q in qs])  # fmt: skip


def variables() -> dict[str, Any]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1, "hide": 0, "regex": "", "options": [],
        }  # fmt: skip

    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        query_var("model", "model", "label_values(rightsizer_requests_total, model)"),
        query_var("backend", "backend", "label_values(rightsizer_backend_up, backend)"),
        query_var("tenant", "tenant", f"label_values({REQ_BY_MODEL}, tenant)"),
        query_var("priority", "priority", f"label_values({REQ_BY_MODEL}, priority)"),
    ]}  # fmt: skip


def dashboard(uid: str, title: str, desc: str, layout: Layout) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": desc, "tags": ["rightsizer", "llm"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": variables(),
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"type": "dashboards", "tags": ["rightsizer"], "asDropdown": False,
                   "title": "rightsizer", "includeVars": True, "keepTime": True}],
        "panels": layout.panels,
    }  # fmt: skip


def traffic() -> dict[str, Any]:
    lay = Layout()
    lay.add(
        stat(
            "Request rate",
            "Requests/s finished through the proxy.",
            targets((f"sum(rate({REQ}[{RI}]))", "req/s")),
            "reqps",
        ),
        6,
        4,
    )
    lay.add(stat("p95 TTFT", "Measured p95 time to first token (arrival to first content chunk).",
                 quantiles("rightsizer_time_to_first_token_seconds", f"{M},{B}", qs=(0.95,)), "s",
                 [("green", None), ("orange", 0.4), ("red", 0.5)]), 6, 4)  # fmt: skip
    lay.add(stat("Upstream error ratio", "upstream_error + timeout over all requests.",
                 targets((f"sum(rate({ERR}[{RI}])) / sum(rate({REQ}[{RI}]))", "errors")),
                 "percentunit",
                 [("green", None), ("red", 0.01)]), 6, 4)  # fmt: skip
    lay.add(
        stat(
            "Shed ratio",
            "Requests shed by admission over all requests.",
            targets(
                (
                    f"sum(rate(rightsizer_shed_total{{{M},{P}}}[{RI}])) "
                    f"/ sum(rate(rightsizer_requests_total{{{M},{P}}}[{RI}]))",
                    "shed",
                )
            ),
            "percentunit",
            [("green", None), ("orange", 0.01), ("red", 0.05)],
        ),
        6,
        4,
    )
    lay.row("Requests")
    lay.add(
        timeseries(
            "Requests by outcome",
            "Finished requests/s by outcome.",
            targets((f"sum by (outcome) (rate({REQ}[{RI}]))", "{{outcome}}")),
            "reqps",
        )
    )
    lay.add(
        timeseries(
            "Requests by backend",
            "Finished requests/s per backend.",
            targets((f"sum by (backend) (rate({REQ}[{RI}]))", "{{backend}}")),
            "reqps",
        )
    )
    lay.add(
        timeseries(
            "Requests by tenant",
            "Finished requests/s per tenant (capped label).",
            targets((f"sum by (tenant) (rate({REQ}[{RI}]))", "{{tenant}}")),
            "reqps",
        )
    )
    lay.add(timeseries("Shed and errors", "Shed requests/s by priority and reason; upstream "
                       "errors and timeouts/s by backend.", targets(
        (f"sum by (priority, reason) (rate(rightsizer_shed_total{{{M},{P}}}[{RI}]))",
         "shed {{priority}} {{reason}}"),
        (f"sum by (backend, outcome) (rate({ERR}[{RI}]))",
         "{{outcome}} {{backend}}"),
        (f"sum by (backend, reason) (rate(rightsizer_upstream_retries_total{{{B}}}[{RI}]))",
         "retry {{backend}} {{reason}}"),
    ), "reqps"))  # fmt: skip
    lay.row("Latency")
    ttft, itl = "rightsizer_time_to_first_token_seconds", "rightsizer_inter_token_latency_seconds"
    slo_t = target("max(rightsizer:slo_ttft_p95_seconds)", "SLO p95", "S")
    slo_i = target("max(rightsizer:slo_itl_p95_seconds)", "SLO p95", "S")
    lay.add(
        timeseries(
            "TTFT percentiles (arrival to first token)",
            "Time to first token: arrival at the proxy (queue wait included) "
            "to the first content-bearing chunk. SLO from the alert rules.",
            [*quantiles(ttft, f"{M},{B}"), slo_t],
            "s",
        )
    )
    lay.add(
        heatmap(
            "TTFT distribution",
            "Histogram buckets of TTFT over time.",
            f"sum by (le) (increase({ttft}_bucket{{{M},{B}}}[{RI}]))",
            "s",
        )
    )
    lay.add(
        timeseries(
            "Inter-token latency percentiles (all token gaps)",
            "Every gap between streamed tokens, pooled over requests: the SLO's definition "
            "(not a percentile of per-request averages). SLO from the alert rules.",
            [*quantiles(itl, f"{M},{B}"), slo_i],
            "s",
        )
    )
    lay.add(
        heatmap(
            "Inter-token latency distribution (all token gaps)",
            "Histogram buckets of every gap between streamed tokens.",
            f"sum by (le) (increase({itl}_bucket{{{M},{B}}}[{RI}]))",
            "s",
        )
    )
    lay.add(
        timeseries(
            "p95 TTFT by backend",
            "Is one backend slower than the others?",
            quantiles(ttft, f"{M},{B}", "backend", (0.95,)),
            "s",
        )
    )
    lay.add(
        timeseries(
            "p95 inter-token latency by backend (all token gaps)",
            "Per-backend decode pace, over every gap between streamed tokens.",
            quantiles(itl, f"{M},{B}", "backend", (0.95,)),
            "s",
        )
    )
    lay.add(timeseries("End-to-end latency (ok)", "Arrival to the last byte, successful requests.",
                       quantiles("rightsizer_request_duration_seconds",
                                 f'{M},{B},outcome="ok"'), "s"))  # fmt: skip
    lay.add(timeseries("Queue wait by priority", "Time in the proxy's queue (arrival to "
                       "dispatch), p95 per priority class.",
                       quantiles("rightsizer_queue_wait_seconds", f"{M},{P}", "priority", (0.95,)),
                       "s"))  # fmt: skip
    lay.add(timeseries("Queue depth", "Requests waiting in the proxy, per priority class.",
                       targets((f"sum by (priority) (rightsizer_queue_depth{{{M},{P}}})",
                                "{{priority}}")), "short"))  # fmt: skip
    lay.row("Tokens")
    lay.add(timeseries("Tokens/s in and out", "Prompt tokens/s (in), of which served from the "
                       "engine's prefix cache, and completion tokens/s (out).", targets(
        (f"sum(rate(rightsizer_prompt_tokens_total{{{M},{B},{T}}}[{RI}]))", "prompt (in)"),
        (f"sum(rate(rightsizer_cached_prompt_tokens_total{{{M},{B}}}[{RI}]))", "cached prompt"),
        (f"sum(rate(rightsizer_completion_tokens_total{{{M},{B},{T}}}[{RI}]))", "completion (out)"),
    ), "short"))  # fmt: skip
    lay.add(timeseries("Tokens/s by tenant", "Prompt + completion tokens/s per tenant.", targets(
        (f"sum by (tenant) (rate(rightsizer_prompt_tokens_total{{{M},{B},{T}}}[{RI}]) "
         f"+ rate(rightsizer_completion_tokens_total{{{M},{B},{T}}}[{RI}]))", "{{tenant}}"),
    ), "short"))  # fmt: skip
    lay.add(
        timeseries(
            "Prompt length",
            "Prompt tokens per request.",
            quantiles("rightsizer_request_prompt_tokens", M),
            "short",
        )
    )
    lay.add(timeseries("Completion length", "Completion tokens per request; estimated counts "
                       "(backend gave no usage) per second.", [
        *quantiles("rightsizer_request_completion_tokens", M),
        target(f"sum(rate(rightsizer_token_counts_estimated_total{{{M},{B}}}[{RI}]))",
               "estimated counts/s", "E"),
    ], "short"))  # fmt: skip
    return dashboard(
        "rightsizer-traffic",
        "rightsizer: traffic and latency",
        "What the proxy measured: rates, TTFT/ITL, queueing, tokens, errors.",
        lay,
    )


def capacity() -> dict[str, Any]:
    lay = Layout()
    e = "rightsizer_estimator_"
    lay.add(stat("Seconds to projected SLO breach", "When the forecast arrival rate reaches the "
                 "capacity that meets the SLO. Empty: no breach within the estimator's "
                 "breach_horizon_s.", targets((f"min({e}time_to_breach_seconds{{{M}}})", "breach")),
                 "s", [("red", None), ("orange", 3600), ("green", 86400)],
                 no_value="no breach projected"), 6, 5)  # fmt: skip
    lay.add(
        stat(
            "Utilization",
            "Current rate / capacity at the SLO.",
            targets((f"max({e}utilization_ratio{{{M}}})", "")),
            "percentunit",
            [("green", None), ("orange", 0.7), ("red", 0.9)],
            kind="gauge",
        ),
        6,
        5,
    )
    lay.add(stat("Replicas: recommended / now", "Replicas for the forecast peak within the SLO "
                 "(N+1) and backends serving the model now.", targets(
        (f"sum({e}recommended_replicas{{{M}}})", "recommended"),
        (f"sum({e}replicas{{{M}}})", "now")), "short"), 6, 5)  # fmt: skip
    lay.add(
        stat(
            "Monthly cost",
            "Deployment cost per hour x 730.",
            targets((f"sum({e}cost_usd_per_hour{{{M}}}) * 730", "")),
            "currencyUSD",
        ),
        6,
        5,
    )
    lay.row("Capacity")
    lay.add(timeseries("Capacity vs rate", "Capacity at the SLO (all replicas), the estimator's "
                       "5-minute rate and forecast peak, and the measured finished rate.", targets(
        (f"{e}capacity_requests_per_second{{{M}}}", "capacity {{model}}"),
        (f"{e}rate_requests_per_second{{{M}}}", "rate (5m) {{model}}"),
        (f"{e}forecast_peak_requests_per_second{{{M}}}", "forecast peak {{model}}"),
        (f"sum by (model) (rate(rightsizer_requests_total{{{M}}}[{RI}]))", "measured {{model}}"),
    ), "reqps"))  # fmt: skip
    lay.add(timeseries("Utilization and headroom", "Rate / capacity (left) and capacity minus "
                       "rate (req/s).", targets(
        (f"{e}utilization_ratio{{{M}}}", "utilization {{model}}"),
        (f"{e}headroom_requests_per_second{{{M}}}", "headroom req/s {{model}}"),
    ), "short"))  # fmt: skip
    lay.add(timeseries("Projected vs measured p95 TTFT", "The estimator's p95 TTFT at the current "
                       "rate, the measured p95 (5 min) and the SLO.", targets(
        (f"{e}projected_ttft_p95_seconds{{{M}}}", "projected {{model}}"),
        (f"rightsizer:ttft_p95_seconds:rate5m{{{M}}}", "measured {{model}}"),
        ("max(rightsizer:slo_ttft_p95_seconds)", "SLO"),
    ), "s"))  # fmt: skip
    lay.add(timeseries("Projected vs measured p95 ITL (all token gaps)", "The estimator's p95 "
                       "over all token gaps at the current rate, the measured p95 over all gaps "
                       "(5 min) and the SLO.",
                       targets(
        (f"{e}projected_itl_p95_seconds{{{M}}}", "projected {{model}}"),
        (f"rightsizer:itl_p95_seconds:rate5m{{{M}}}", "measured {{model}}"),
        ("max(rightsizer:slo_itl_p95_seconds)", "SLO"),
    ), "s"))  # fmt: skip
    lay.add(
        timeseries(
            "Seconds to projected breach",
            "Absent when none is projected.",
            targets((f"{e}time_to_breach_seconds{{{M}}}", "{{model}}")),
            "s",
        )
    )
    lay.add(timeseries("Arrival-rate trend", "Robust trend (req/s per hour; 0 when not "
                       "significant).", targets(
        (f"{e}trend_requests_per_second_per_hour{{{M}}}", "{{model}}")), "short"))  # fmt: skip
    lay.add(timeseries("Replicas: recommended vs actual", "Recommended (forecast peak, N+1) and "
                       "serving now.", targets(
        (f"{e}recommended_replicas{{{M}}}", "recommended {{model}}"),
        (f"{e}replicas{{{M}}}", "now {{model}}"),
    ), "short"))  # fmt: skip
    lay.add(timeseries("Per-backend rate", "Arrival rate per backend (estimator, 5 min).", targets(
        (f"{e}backend_rate_requests_per_second{{{B}}}", "{{backend}}")), "reqps"))  # fmt: skip
    lay.row("Cost")
    lay.add(timeseries("$ per 1M tokens at the current rate", "Input and output tokens priced at "
                       "the estimator's current (5-minute) rate; at capacity they cost less.",
                       targets(
        (f"{e}cost_usd_per_1m_input_tokens{{{M}}}", "input {{model}}"),
        (f"{e}cost_usd_per_1m_output_tokens{{{M}}}", "output {{model}}"),
    ), "currencyUSD"), 8)  # fmt: skip
    lay.add(timeseries("$ per hour and per month", "Deployment cost.", targets(
        (f"{e}cost_usd_per_hour{{{M}}}", "per hour {{model}}"),
        (f"{e}cost_usd_per_hour{{{M}}} * 730", "per month {{model}}"),
    ), "currencyUSD"), 8)  # fmt: skip
    lay.add(timeseries("$ per request at the current rate", "The hourly cost over the "
                       "estimator's current (5-minute) rate.", targets(
        (f"{e}cost_usd_per_request{{{M}}}", "{{model}}")), "currencyUSD"), 8)  # fmt: skip
    lay.row("Trust")
    lay.add(timeseries("Estimator fit error (p90)", "p90 relative error of the step-time model on "
                       "observed latencies; above 0.5 the projections are not to be trusted.",
                       targets((f"{e}fit_relative_error_p90{{{M}}}", "{{model}}")),
                       "percentunit"))  # fmt: skip
    lay.add(timeseries("Rightsizer alerts", "Pending and firing rightsizer alerts (1 while "
                       "active), from Prometheus' ALERTS series.", targets(
        ('ALERTS{alertname=~"Rightsizer.*"}', "{{alertstate}} {{alertname}} {{model}}{{backend}}")),
        "short"))  # fmt: skip
    return dashboard(
        "rightsizer-capacity",
        "rightsizer: capacity and cost",
        "The estimator's projections: capacity at the SLO, time to breach, "
        "replicas, cost, and how far to trust them.",
        lay,
    )


def backends() -> dict[str, Any]:
    lay = Layout()
    lay.add(timeseries("Backend up", "1: in rotation; 0: failed health checks or ejected.",
                       targets((f"rightsizer_backend_up{{{B}}}", "{{instance}} {{backend}}")),
                       "short", min=0, max=1), 12, 6)  # fmt: skip
    lay.add(timeseries("In flight (proxy)", "Requests and tokens the proxy has in flight on "
                       "each backend.", targets(
        (f"sum by (backend) (rightsizer_backend_inflight_requests{{{B}}})", "requests {{backend}}"),
        (f"sum by (backend) (rightsizer_shared_state_remote_inflight{{{B}}})",
         "other replicas {{backend}}"),
    ), "short"), 12, 6)  # fmt: skip
    lay.row("Engines (scraped /metrics)")
    lay.add(timeseries("Running and waiting", "Sequences the engine runs and queues.", targets(
        (f"rightsizer_engine_running_requests{{{B}}}", "running {{backend}}"),
        (f"rightsizer_engine_waiting_requests{{{B}}}", "waiting {{backend}}"),
    ), "short"))  # fmt: skip
    lay.add(timeseries("KV-cache usage", "Fraction of the engine's KV blocks in use.", targets(
        (f"rightsizer_engine_kv_cache_usage_ratio{{{B}}}", "{{backend}}")), "percentunit",
        min=0, max=1))  # fmt: skip
    lay.add(timeseries("Prefix-cache hit rate", "Engine prefix-cache hits / queries (tokens); "
                       "cached share of prompt tokens the backend reported.", targets(
        (f"rate(rightsizer_engine_prefix_cache_hits_total{{{B}}}[{RI}]) / "
         f"rate(rightsizer_engine_prefix_cache_queries_total{{{B}}}[{RI}])",
         "engine {{backend}}"),
        (f"sum by (backend) (rate(rightsizer_cached_prompt_tokens_total{{{B}}}[{RI}])) / sum by "
         f"(backend) (rate(rightsizer_prompt_tokens_total{{{B}}}[{RI}]))", "usage {{backend}}"),
        (f"rightsizer_estimator_backend_prefix_cache_hit_ratio{{{B}}}", "estimator {{backend}}"),
    ), "percentunit"))  # fmt: skip
    lay.add(timeseries("Preemptions and KV capacity", "Preemptions/s; KV capacity in tokens "
                       "(right axis).", targets(
        (f"rightsizer_estimator_backend_preemptions_per_second{{{B}}}",
         "preemptions/s {{backend}}"),
        (f"rightsizer_estimator_backend_kv_capacity_tokens{{{B}}}", "KV tokens {{backend}}"),
    ), "short"))  # fmt: skip
    lay.add(timeseries("Scrapes and failures", "Engine /metrics scrapes by result; backend "
                       "failures by kind.", targets(
        (f"sum by (backend, result) (rate(rightsizer_backend_scrapes_total{{{B}}}[{RI}]))",
         "scrape {{result}} {{backend}}"),
        (f"sum by (backend, kind) (rate(rightsizer_backend_failures_total{{{B}}}[{RI}]))",
         "failure {{kind}} {{backend}}"),
    ), "ops"))  # fmt: skip
    lay.add(timeseries("Routing and shared state", "Routing decisions/s by reason; Redis up "
                       "(1) per proxy replica.", targets(
        (f"sum by (backend, reason) (rate(rightsizer_routing_decisions_total{{{B}}}[{RI}]))",
         "{{reason}} {{backend}}"),
        ("rightsizer_shared_state_up", "redis up {{instance}}"),
    ), "short"))  # fmt: skip
    lay.row("GPUs (pynvml sampler)")
    gl = "{{instance}} gpu{{gpu}} {{name}}"
    lay.add(timeseries("GPU memory used", "Memory in use vs installed.", targets(
        ("rightsizer_gpu_memory_used_bytes", f"used {gl}"),
        ("rightsizer_gpu_memory_total_bytes", f"total {gl}"),
    ), "bytes"))  # fmt: skip
    lay.add(timeseries("GPU memory used ratio", "Used / total; the alert fires above 85%.",
                       targets((f"{GPU_USED} / rightsizer_gpu_memory_total_bytes",
                                gl)), "percentunit", min=0, max=1))  # fmt: skip
    lay.add(timeseries("GPU utilization", "Fraction of time a kernel ran.", targets(
        ("rightsizer_gpu_utilization_ratio", gl)), "percentunit", min=0, max=1), 8)  # fmt: skip
    lay.add(timeseries("GPU power", "Board power draw.", targets(
        ("rightsizer_gpu_power_watts", gl)), "watt"), 8)  # fmt: skip
    lay.add(timeseries("GPU temperature and throttling", "Core temperature; throttle reasons "
                       "bitmask (0: none; 1: idle).", targets(
        ("rightsizer_gpu_temperature_celsius", f"°C {gl}"),
        ("rightsizer_gpu_throttle_reasons", f"reasons {gl}"),
    ), "celsius"), 8)  # fmt: skip
    return dashboard(
        "rightsizer-backends",
        "rightsizer: backends and GPUs",
        "Engine state scraped by the proxy and GPU telemetry from NVML.",
        lay,
    )


def experiments() -> dict[str, Any]:
    """Groups side by side: split, latency, errors, shadow, rollback evidence, the verdict."""
    lay = Layout()
    ex, gr = 'experiment=~"$experiment"', 'group=~"$group"'
    gsel = f"{M},{gr}"
    grq = f"rightsizer_group_requests_total{{{gsel}}}"
    lay.add(
        stat(
            "Canary weight",
            "Share of the experiment's traffic the candidate gets (0 after a rollback).",
            targets((f"rightsizer_experiment_weight{{{ex},{gr}}}", "{{experiment}} {{group}}")),
            "percentunit",
        ),
        6,
        5,
    )
    lay.add(stat("Rolled back", "1 while the experiment is rolled back (weight 0 until set again "
                 "with POST /admin/experiments/<name>).", targets(
        (f'max by (experiment) (rightsizer_experiment_state{{{ex},state="rolled_back"}})',
         "{{experiment}}")), "short", [("green", None), ("red", 1)]), 6, 5)  # fmt: skip
    lay.add(stat("Cost ratio candidate / baseline", "Estimator's verdict: $/month of the candidate "
                 "over the baseline's at the current rate (below 1: cheaper).", targets(
        (f"rightsizer_experiment_cost_ratio{{{ex}}}", "{{experiment}}")), "short",
        [("green", None), ("orange", 1.0), ("red", 1.2)]), 6, 5)  # fmt: skip
    lay.add(stat("Model version drift", "Distinct versions announced in a group minus one "
                 "(0: its backends agree).", targets(
        (f"max by (group) (rightsizer_model_version_drift{{{gsel}}})", "{{group}}")), "short",
        [("green", None), ("red", 1)]), 6, 5)  # fmt: skip
    lay.row("Traffic per group")
    lay.add(timeseries("Requests/s per group", "Finished requests per group, live and shadow "
                       "copies apart.", targets(
        (f"sum by (group, traffic) (rate({grq}[{RI}]))", "{{group}} {{traffic}}")),
        "reqps"))  # fmt: skip
    lay.add(timeseries("Error ratio per group", "upstream_error, timeout and client_error over "
                       "all finished requests, per group (live and shadow).", targets(
        (f'sum by (group, traffic) (rate(rightsizer_group_requests_total{{{gsel},'
         f'outcome=~"upstream_error|timeout|client_error"}}[{RI}])) / sum by (group, traffic) '
         f"(rate({grq}[{RI}]))", "{{group}} {{traffic}}")), "percentunit"))  # fmt: skip
    ttft, itl = (
        "rightsizer_group_time_to_first_token_seconds",
        ("rightsizer_group_inter_token_latency_seconds"),
    )
    lay.add(timeseries("TTFT p50 / p95 per group", "Time to first token per group (live: as "
                       "clients saw it; shadow: from sending the copy).", [
        *quantiles(ttft, gsel, "group, traffic", (0.5, 0.95)),
        target("max(rightsizer:slo_ttft_p95_seconds)", "SLO p95", "S")], "s"))  # fmt: skip
    lay.add(timeseries("Inter-token latency p50 / p95 per group", "Gaps between streamed chunks "
                       "per group.", [*quantiles(itl, gsel, "group, traffic", (0.5, 0.95)),
                                      target("max(rightsizer:slo_itl_p95_seconds)", "SLO p95",
                                             "S")], "s"))  # fmt: skip
    lay.add(timeseries("Tokens/s per group", "Prompt and completion tokens per group.", targets(
        (f"sum by (group, kind) (rate(rightsizer_group_tokens_total{{{gsel}}}[{RI}]))",
         "{{group}} {{kind}}")), "short"))  # fmt: skip
    lay.add(timeseries("Assignments", "Requests assigned to a group per second, by why "
                       "(weight, header, tenant).", targets(
        (f"sum by (group, reason) (rate(rightsizer_experiment_assignments_total{{{ex},{gr}}}"
         f"[{RI}]))", "{{group}} {{reason}}")), "reqps"))  # fmt: skip
    lay.row("Rollback evidence (the rule's window)")
    w = "rightsizer_experiment_window_"
    lay.add(timeseries("Error ratio in the window", "Failed attempts / attempts in the rollback "
                       "window; the candidate is rolled back when its ratio exceeds the "
                       "baseline's by error_margin with the configured confidence.", targets(
        (f"{w}errors{{{ex},{gr}}} / {w}requests{{{ex},{gr}}}", "{{experiment}} {{group}}")),
        "percentunit"))  # fmt: skip
    lay.add(timeseries("SLO misses in the window", "Requests missing the TTFT or ITL target / "
                       "requests judged, in the rollback window.", targets(
        (f"{w}slo_misses{{{ex},{gr}}} / {w}slo_samples{{{ex},{gr}}}", "{{experiment}} {{group}}")),
        "percentunit"))  # fmt: skip
    lay.add(timeseries("Rollbacks", "Automatic rollbacks by reason (errors, slo, unavailable).",
                       targets((f"sum by (experiment, reason) (increase("
                                f"rightsizer_experiment_rollbacks_total{{{ex}}}[{RI}]))",
                                "{{experiment}} {{reason}}")), "short"))  # fmt: skip
    lay.add(timeseries("Shadow copies", "Shadow copies per second by result (ok, error, dropped: "
                       "queue_full, busy, stale) and the shadow queue.", targets(
        (f"sum by (result) (rate(rightsizer_shadow_requests_total{{{ex}}}[{RI}]))",
         "{{result}}"),
        (f"sum by (experiment) (rightsizer_shadow_queue_depth{{{ex}}})", "queue {{experiment}}"),
    ), "short"))  # fmt: skip
    lay.row("Verdict (the estimator, on the same traffic)")
    lay.add(timeseries("Capacity at the SLO per replica", "Each group's estimated capacity on "
                       "the experiment's traffic mix (managed APIs: none).", targets(
        (f"rightsizer_experiment_capacity_requests_per_second{{{ex},{gr}}}", "{{group}}")),
        "reqps"), 8)  # fmt: skip
    lay.add(timeseries("$/month at the current rate", "Each group serving all of the "
                       "experiment's traffic: whole replicas at the SLO, or the managed bill.",
                       targets((f"rightsizer_experiment_cost_usd_per_month{{{ex},{gr}}}",
                                "{{group}}")), "currencyUSD"), 8)  # fmt: skip
    lay.add(timeseries("$/1M tokens", "At capacity (GPU groups) or list price (managed).",
                       targets((f"rightsizer_experiment_cost_usd_per_1m_tokens{{{ex},{gr}}}",
                                "{{group}}")), "currencyUSD"), 8)  # fmt: skip
    lay.add(timeseries("Backends' announced versions", "1 per backend, group, model and the "
                       "digest of what it announces; two digests in a group are drift.", targets(
        (f"rightsizer_backend_model_version_info{{{gsel}}}",
         "{{group}} {{backend}} {{version}}")), "short"), 24)  # fmt: skip
    dash = dashboard(
        "rightsizer-experiments",
        "rightsizer: experiments",
        "Canary and shadow experiments between deployment groups, side by side, "
        "with the rollback rule's evidence and the estimator's verdict.",
        lay,
    )
    dash["templating"]["list"] += [
        _query_var("experiment", "label_values(rightsizer_experiment_weight, experiment)"),
        _query_var("group", "label_values(rightsizer_backend_group_info, group)"),
    ]
    return dash


def _query_var(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": name, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "regex": "", "options": [],
    }  # fmt: skip


DASHBOARDS = {"traffic.json": traffic, "capacity.json": capacity, "backends.json": backends,
              "experiments.json": experiments}  # fmt: skip


def render() -> dict[str, str]:
    return {name: json.dumps(fn(), indent=2, ensure_ascii=False) + "\n"
            for name, fn in DASHBOARDS.items()}  # fmt: skip


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
