"""Dashboards and alerts against the real thing.

1. ``test_dashboards_and_alerts_use_only_exported_metrics``: a proxy (estimator on, Redis
   shared state) in front of two emulated engines under some load, until the estimator's
   gauges appear; every metric and label that a dashboard panel, a template variable or an
   alert/recording rule names must be in the proxy's ``/metrics`` (the GPU gauges: in
   ``proxy.gpu.GPU_METRICS``, since there is no GPU here).

2. ``test_projected_breach_alert_fires_before_measured_breach``: a real Prometheus scrapes a
   real proxy in front of two emulated llama-3.1-8b-on-A10G engines (the estimator's physical
   engine model, so latency rises with load) under a rate ramp, evaluating a test copy of
   ``configs/alerts/rightsizer.rules.yml`` (see ``test_rules``: 1 s evaluation, every
   ``for:`` and the ``[5m]`` windows 20x shorter, so "p95 over the SLO for 5 minutes" becomes
   "for 15 s over a 15 s window"; the ITL SLO at 0.1 s as in the proxy's config here;
   expressions otherwise unchanged). The projected-breach alert must be firing before the
   measured breach (the SLO-breached alert that goes on to fire) began.

   Why this test takes about four minutes, not three: the estimator fits its arrival-rate
   trend on per-minute counts (``estimator/traffic.py``: 60 s buckets, fixed) and only over
   complete minutes after the first request, and it needs three of them (``TrafficStats.trend``
   returns no trend for n < 3). Before that, ``time_to_breach`` is absent, or 0 once the
   average rate since the start already exceeds capacity, which is later than the real breach.
   So the projection can lead the breach only after >= 180 s of traffic past the first
   minute boundary. The ramp is shaped from the estimator's own capacity figure: 0.3x to 0.6x
   capacity over those three minutes, then four times steeper, to 1.6x, until the measured
   breach (so the measured lead is shorter than the time to breach the alert projected).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry import GPU_METRICS
from tests.support.procs import (
    Proc,
    free_port,
    http_get,
    metric_value,
    start_emulator,
    start_proxy,
    wait_for,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "configs" / "alerts" / "rightsizer.rules.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
MODEL_CONFIG = str(ROOT / "configs" / "models" / "llama-3.1-8b.json")
# made by Prometheus itself, not by the proxy
PROMETHEUS_METRICS = {"up": {"job", "instance"}, "ALERTS": {"alertname", "alertstate"}}
TARGET_LABELS = {"job", "instance"}


def _require(exe: str) -> str:
    path = shutil.which(exe)
    if path is None:
        msg = f"{exe} is not installed (Debian package 'prometheus'; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# ---- the metrics the proxy exports ----------------------------------------------------------
def exported(text: str) -> dict[str, set[str] | None]:
    """Family name -> label names seen on its samples (None: no sample yet, labels unknown).
    Histogram and counter families are listed under every name a query can use."""
    out: dict[str, set[str] | None] = {}
    for fam in text_string_to_metric_families(text):
        names = {fam.name}
        if fam.type == "histogram":
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        if fam.type == "counter":
            names |= {f"{fam.name}_total", f"{fam.name}_created"}
        labels: set[str] | None = None
        for s in fam.samples:
            labels = (labels or set()) | set(s.labels)
        for n in names:
            out[n] = labels
    for name, labels in GPU_METRICS.items():
        out[name] = set(labels)
    for name, labels in PROMETHEUS_METRICS.items():
        out[name] = set(labels)
    return out


# ---- what dashboards and rules query --------------------------------------------------------
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


@dataclass
class Use:
    where: str
    expr: str
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def parse_uses(where: str, expr: str) -> Use:
    """Metric selectors (name, matcher labels) and grouping labels in one PromQL expression."""
    use = Use(where, expr)
    body = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    body = re.sub(r"\[[^\]]*\]", "", body)  # range and subquery windows
    for m in _GROUPING.finditer(body):
        use.grouping |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    body = _GROUPING.sub(" ", body)
    for m in _SELECTOR.finditer(body):
        name = m.group(1)
        if not (name.startswith("rightsizer") or name in PROMETHEUS_METRICS):
            continue
        labels = {x.group(1) for x in _MATCHER.finditer(m.group(2) or "")}
        use.selectors.append((name, labels))
    assert use.selectors or "vector(" in expr, f"{where}: no metric found in {expr!r}"
    return use


def label_values_query(where: str, query: str) -> Use:
    m = re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_]\w*)\)", query.strip())
    assert m, f"{where}: unsupported variable query {query!r}"
    use = parse_uses(where, m.group(1))
    use.grouping.add(m.group(2))
    return use


def dashboard_uses() -> list[Use]:
    uses = []
    for path in DASHBOARDS:
        dash = orjson.loads(path.read_bytes())
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                uses.append(label_values_query(f"{path.name} variable {var['name']}", q))
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                uses.append(parse_uses(f"{path.name} panel {panel['title']!r}", t["expr"]))
    return uses


def rule_uses(rules: dict[str, Any]) -> tuple[list[Use], dict[str, set[str]]]:
    """Uses in every rule, and the recording rules' outputs (name -> labels they keep)."""
    uses, recorded = [], {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            use = parse_uses(f"rule {name}", rule["expr"])
            uses.append(use)
            if "record" in rule:
                recorded[rule["record"]] = use.grouping - {"le"}
    return uses, recorded


def missing(uses: list[Use], have: dict[str, set[str] | None]) -> list[str]:
    problems = []
    for use in uses:
        metric_labels: set[str] = set(TARGET_LABELS)
        for name, labels in use.selectors:
            if name not in have:
                problems.append(f"{use.where}: metric {name} is not exported")
                continue
            known = have[name]
            if known is None:
                continue  # family exported, no sample yet: labels unknown
            metric_labels |= known
            for label in labels - known - TARGET_LABELS:
                problems.append(f"{use.where}: {name} has no label {label!r} (has {sorted(known)})")
        absent = use.grouping - metric_labels - {"le"}
        if absent and all(have.get(n) is not None for n, _ in use.selectors):
            problems.append(f"{use.where}: grouping by {sorted(absent)} that no metric has")
    return problems


def test_query_parser_finds_metrics_and_labels() -> None:
    use = parse_uses(
        "t",
        'histogram_quantile(0.95, sum by (le, model) (rate(rightsizer_x_bucket{model=~"$model",'
        'backend="a"}[$__rate_interval]))) > scalar(rightsizer:slo) and on() vector(1)',
    )
    assert use.selectors == [
        ("rightsizer_x_bucket", {"model", "backend"}),
        ("rightsizer:slo", set()),
    ]
    assert use.grouping == {"le", "model"}
    have = {"rightsizer_x_bucket": {"model", "le"}, "rightsizer:slo": set()}
    assert missing([use], have) == [
        "t: rightsizer_x_bucket has no label 'backend' (has ['le', 'model'])"
    ]
    assert missing([parse_uses("u", "rightsizer_nope")], have) == [
        "u: metric rightsizer_nope is not exported"
    ]


# ---- running processes ----------------------------------------------------------------------
@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


class Redis:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@dataclass
class Load:
    sent: int = 0
    done: int = 0
    failed: int = 0


async def _one(s: aiohttp.ClientSession, url: str, body: dict[str, Any], hdrs: dict[str, str],
               load: Load) -> None:  # fmt: skip
    load.sent += 1
    try:
        async with s.post(url + "/v1/chat/completions", data=orjson.dumps(body), headers=hdrs) as r:
            async for _ in r.content.iter_any():
                pass
            load.failed += r.status >= 500
    except aiohttp.ClientError:
        load.failed += 1
    load.done += 1


def _body(rng: random.Random, model: str) -> dict[str, Any]:
    words = " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(60, 250)))
    return {"model": model, "messages": [{"role": "user", "content": words}],
            "max_tokens": rng.randint(32, 96), "stream": True}  # fmt: skip


async def drive(url: str, model: str, rate: Callable[[float], float | None],
                load: Load, *, tenants: tuple[str, ...] = ("acme",),
                priorities: tuple[str, ...] = ("normal",)) -> None:  # fmt: skip
    """Evenly spaced arrivals at ``rate(epoch)`` requests/s until it returns None."""
    rng = random.Random(11)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        while (r := rate(time.time())) is not None:
            hdrs = {"x-tenant": rng.choice(tenants), "x-priority": rng.choice(priorities)}
            task = asyncio.create_task(_one(s, url, _body(rng, model), hdrs, load))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1.0 / max(r, 0.05))
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _gauge(text: str, name: str, **labels: str) -> float | None:
    if f"{name}{{" not in text:
        return None
    return metric_value(text, name, **labels)


def _estimator_config(**over: Any) -> dict[str, Any]:
    return {
        "enabled": True, "refresh_interval_s": 1.0, "gpu": "a10g",
        "model_configs": {"llama": MODEL_CONFIG}, "min_records": 20, "trend_window_s": 180.0,
        "latency_window_s": 30.0, "forecast_horizon_s": 300.0, "breach_horizon_s": 3600.0,
        "advisor_gpus": ["a10g"], **over,
    }  # fmt: skip


def _emulators(n: int, cleanup: contextlib.ExitStack) -> list[Proc]:
    emus = []
    for _ in range(n):
        e = start_emulator("llama", extra=["--model", MODEL_CONFIG, "--gpu", "a10g",
                                           "--max-num-seqs", "64"])  # fmt: skip
        cleanup.callback(e.stop)
        emus.append(e)
    return emus


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """Stops what a test started even when start-up fails half way (each stop is idempotent)."""
    with contextlib.ExitStack() as stack:
        yield stack


# ---- 1. every query names exported metrics ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dashboards_and_alerts_use_only_exported_metrics(cleanup: contextlib.ExitStack) -> None:
    assert len(DASHBOARDS) == 4
    redis_srv = Redis()
    cleanup.callback(redis_srv.stop)
    emus = _emulators(2, cleanup)
    cfg = {
        "backends": [
            {"url": e.url, "max_inflight": 6, "name": f"emu-{i}"} for i, e in enumerate(emus)
        ],
        # groups and an experiment, so the experiment families the dashboards query exist
        "groups": [
            {"name": "a", "backends": ["emu-0"], "gpu": "a10g"},
            {"name": "b", "backends": ["emu-1"], "gpu": "a10g"},
        ],
        "experiments": [
            {
                "name": "ab",
                "baseline": "a",
                "candidate": "b",
                "weight": 0.5,
                "shadow": {"share": 0.2},
            }
        ],
        "estimator": _estimator_config(),
        "health": {"scrape_interval_s": 0.5, "interval_s": 1.0},
        "shared": {"redis_url": f"redis://127.0.0.1:{redis_srv.port}/0"},
        "scheduling": {"max_queue": 4},  # a burst overflows it: shed_total gets samples
    }
    proxy = start_proxy([], config=cfg)
    cleanup.callback(proxy.stop)
    with stopping(proxy, *emus, redis_srv):
        load = Load()
        deadline = time.time() + 60

        def rate(now: float) -> float | None:
            text = cache.get("text", "")
            ready = "rightsizer_estimator_capacity_requests_per_second{" in text
            return None if ready or now > deadline else 4.0

        cache: dict[str, str] = {}

        async def run() -> None:
            async def scrape() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    cache["text"] = await asyncio.to_thread(proxy.metrics_text)

            task = asyncio.create_task(scrape())
            await drive(proxy.url, "llama", rate, load, tenants=("acme", "globex"),
                        priorities=("high", "normal", "sheddable"))  # fmt: skip
            # a burst well over the queue: some requests shed
            burst = Load()
            await asyncio.gather(*(drive(proxy.url, "llama", _n_times(3, 50.0), burst,
                                         priorities=("sheddable",)) for _ in range(30)))  # fmt: skip
            task.cancel()

        asyncio.run(run())
        wait_for(lambda: "rightsizer_estimator_time_to_breach_seconds" in proxy.metrics_text()
                 or "rightsizer_estimator_capacity" in proxy.metrics_text(), timeout_s=20)  # fmt: skip
        have = exported(proxy.metrics_text())

    assert load.done > 20, load
    with open(RULES) as f:
        rules = yaml.safe_load(f)
    r_uses, recorded = rule_uses(rules)
    for name, labels in recorded.items():
        have[name] = labels
    uses = dashboard_uses() + r_uses
    problems = missing(uses, have)
    assert not problems, "\n".join(problems)
    # the estimator's headline gauges and the metrics with samples-dependent labels are there
    for name in ("rightsizer_estimator_capacity_requests_per_second",
                 "rightsizer_estimator_recommended_replicas", "rightsizer_shared_state_up",
                 "rightsizer_engine_kv_cache_usage_ratio", "rightsizer_shed_total"):  # fmt: skip
        assert have.get(name) is not None, f"{name} has no samples"
    queried = {n for u in uses for n, _ in u.selectors}
    assert len(queried) >= 40, sorted(queried)


def _n_times(n: int, r: float) -> Callable[[float], float | None]:
    count = [0]

    def rate(_: float) -> float | None:
        count[0] += 1
        return r if count[0] <= n else None

    return rate


# ---- 2. the projected breach leads the measured one ------------------------------------------
TEST_SLO_TTFT_S = 0.5
TEST_SLO_ITL_S = 0.1  # emulated A10G decode steps are ~35-50 ms at low load: 0.05 s is no target


def test_rules(rules: dict[str, Any]) -> dict[str, Any]:
    """The production rules with test timings (documented in the module docstring)."""
    slo = {"rightsizer:slo_ttft_p95_seconds": TEST_SLO_TTFT_S,
           "rightsizer:slo_itl_p95_seconds": TEST_SLO_ITL_S}  # fmt: skip
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{max(1, _seconds(rule['for']) // 20)}s"
            rule["expr"] = rule["expr"].replace("[5m]", "[15s]")
            if rule.get("record") in slo:
                rule["expr"] = f"vector({slo[rule['record']]})"
    return rules


def _seconds(duration: str) -> int:
    n, unit = int(duration[:-1]), duration[-1]
    return n * {"s": 1, "m": 60, "h": 3600}[unit]


test_rules.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class Prometheus:
    def __init__(self, target: str, rules: dict[str, Any], workdir: Path) -> None:
        exe = _require("prometheus")
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [{"job_name": "rightsizer", "static_configs": [{"targets": [target]}]}],
        }))  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(self._ready, timeout_s=30, interval_s=0.2)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log.name}")
        with contextlib.suppress(OSError):
            return http_get(self.url + "/-/ready", timeout=1.0)[0] == 200
        return False

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = orjson.loads(http_get(self.url + "/api/v1/alerts")[1])[
            "data"
        ]["alerts"]
        return alerts

    def query(self, q: str) -> list[dict[str, Any]]:
        from urllib.parse import quote

        res: list[dict[str, Any]] = orjson.loads(
            http_get(f"{self.url}/api/v1/query?query={quote(q)}")[1])["data"]["result"]  # fmt: skip
        return res

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class Timeline:
    boundary: float = 0.0  # epoch of the first complete minute of traffic
    capacity: float | None = None  # the estimator's, when the ramp was shaped
    capacities: list[float] = field(default_factory=list)  # the estimator's, every second
    projected_at: float | None = None  # the projected-breach alert went pending
    projected_ttb_s: float | None = None  # its time to breach then
    projected_firing_at: float | None = None
    projected_description: str = ""
    measured_at: float | None = None  # start of the sustained measured breach (p95 > SLO)
    measured_firing_at: float | None = None  # ... once sustained for the rule's for:
    measured: str = ""
    transients: list[str] = field(default_factory=list)  # measured alerts that went pending
    rows: list[str] = field(default_factory=list)


PROJECTED = "RightsizerSloBreachProjectedSoon"
MEASURED = ("RightsizerTtftSloBreached", "RightsizerItlSloBreached")


def _epoch(ts: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds, 'Z') as epoch seconds."""
    from datetime import datetime

    head, _, frac = ts.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def _watch(prom: Prometheus, proxy: Proc, tl: Timeline, stop: Callable[[], bool]) -> None:
    """Poll Prometheus's alerts and the measured p95 every second (runs in a thread)."""
    while not stop():
        alerts = prom.alerts()
        for a in alerts:
            name, at = a["labels"]["alertname"], _epoch(a["activeAt"])
            if name == PROJECTED and tl.projected_at is None:
                tl.projected_at, tl.projected_ttb_s = at, float(a["value"])
                tl.projected_description = a["annotations"]["description"]
            if name == PROJECTED and a["state"] == "firing" and tl.projected_firing_at is None:
                tl.projected_firing_at = time.time()
            if name in MEASURED and f"{name}@{at:.0f}" not in tl.transients:
                tl.transients.append(f"{name}@{at:.0f}")
            if name in MEASURED and a["state"] == "firing" and tl.measured_at is None:
                tl.measured_at, tl.measured_firing_at = at, time.time()
                tl.measured = f"{name}, p95 {float(a['value']):.3f}s"
        ttft = prom.query("max(rightsizer:ttft_p95_seconds:rate5m)")
        itl = prom.query("max(rightsizer:itl_p95_seconds:rate5m)")
        text = proxy.metrics_text()
        est = {k: _gauge(text, f"rightsizer_estimator_{k}", model="llama") for k in
               ("rate_requests_per_second", "trend_requests_per_second_per_hour",
                "capacity_requests_per_second", "time_to_breach_seconds")}  # fmt: skip
        if est["capacity_requests_per_second"] is not None:
            tl.capacities.append(est["capacity_requests_per_second"])
        tl.rows.append(
            f"t={time.time() - tl.boundary:6.1f}s ttft_p95={_v(ttft)} itl_p95={_v(itl)} "
            + " ".join(
                f"{k.split('_')[0]}={v if v is None else round(v, 2)}" for k, v in est.items()
            )
            + f" alerts={sorted({a['labels']['alertname'] + ':' + a['state'] for a in alerts})}"
        )
        time.sleep(1.0)


def _v(res: list[dict[str, Any]]) -> str:
    return f"{float(res[0]['value'][1]):.3f}" if res else "none"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_projected_breach_alert_fires_before_measured_breach(
    tmp_path: Path, cleanup: contextlib.ExitStack
) -> None:
    _require("prometheus")
    emus = _emulators(2, cleanup)
    cfg = {
        "estimator": _estimator_config(
            slo_ttft_p95_s=TEST_SLO_TTFT_S, slo_itl_p95_s=TEST_SLO_ITL_S
        ),
        "health": {"scrape_interval_s": 1.0, "interval_s": 1.0},
    }
    proxy = start_proxy([e.url for e in emus], config=cfg)
    cleanup.callback(proxy.stop)
    with open(RULES) as f:
        rules = test_rules(yaml.safe_load(f))
    prom = Prometheus(proxy.url.removeprefix("http://"), rules, tmp_path)
    cleanup.callback(prom.stop)
    tl = Timeline()
    done = [False]
    load = Load()
    with stopping(prom, proxy, *emus):
        # a warm-up of 20 to 60 s before the first complete minute, at a rate close to where
        # the ramp starts (0.3x capacity): the estimator needs min_records (10 s at 2 req/s)
        # before it publishes a capacity, and the trend must see no step at the boundary
        while time.time() % 60.0 > 40.0:
            time.sleep(0.2)
        tl.boundary = math.ceil(time.time() / 60.0) * 60.0
        b = tl.boundary

        def rate(now: float) -> float | None:
            if tl.measured_at is not None or now > b + 290:
                return None
            if tl.capacity is None and now >= b and tl.capacities:
                # the median of the last 15 refreshes (it varies +-10%)
                tl.capacity = statistics.median(tl.capacities[-15:])
            if tl.capacity is None:  # warm-up (or no capacity published yet: then give up)
                return 2.0 if now < b + 30 else None
            c, t = tl.capacity, now - b
            if t <= 180:  # 0.3x -> 0.6x capacity over the three minutes the trend needs
                return c * (0.3 + 0.3 * t / 180)
            return min(c * 1.6, c * (0.6 + 0.6 * (t - 180) / 60))  # then faster, past capacity

        async def run() -> None:
            watcher = asyncio.create_task(
                asyncio.to_thread(_watch, prom, proxy, tl, lambda: done[0])
            )
            try:
                await drive(proxy.url, "llama", rate, load)
                # let the watcher see the alerts the last requests caused
                for _ in range(20):
                    if tl.measured_at is not None:
                        break
                    await asyncio.sleep(1.0)
            finally:
                done[0] = True
                await watcher

        asyncio.run(run())

    report = "\n".join(tl.rows[-60:])
    print(report)
    assert tl.capacity is not None, f"no capacity published by the first minute\n{report}"
    assert load.failed == 0, load
    assert tl.projected_at is not None, f"the projected-breach alert never went pending\n{report}"
    assert tl.projected_firing_at is not None, f"the projected-breach alert never fired\n{report}"
    assert tl.measured_at is not None, f"no sustained measured breach by the deadline\n{report}"
    assert tl.measured_firing_at is not None
    lead = tl.measured_at - tl.projected_firing_at
    print(
        f"capacity {tl.capacity:.2f} req/s; projected alert pending at "
        f"t={tl.projected_at - b:.1f}s (time to breach {tl.projected_ttb_s:.0f}s), firing at "
        f"t={tl.projected_firing_at - b:.1f}s; sustained measured breach ({tl.measured}) from "
        f"t={tl.measured_at - b:.1f}s, firing at t={tl.measured_firing_at - b:.1f}s; lead "
        f"{lead:.1f}s (pending to breach start {tl.measured_at - tl.projected_at:.1f}s); "
        f"measured alerts that went pending: {tl.transients}"
    )
    assert tl.projected_at >= b + 175, "projected before the trend could exist: not a forecast"
    assert lead > 0, f"the measured breach came first (lead {lead:.1f}s)\n{report}"
    assert re.search(r"llama reaches the capacity .* in \d+m? ?\d", tl.projected_description), (
        tl.projected_description
    )
