"""Proxy overhead: the same load directly against a fast stub engine and through the proxy.

    python3 bench/proxy_overhead.py            # full run, about 2.5 minutes
    python3 bench/proxy_overhead.py --quick    # about 1 minute, for development
    python3 bench/proxy_overhead.py --json out.json --scenarios A,C

Per scenario it starts ``bench/stub_backend.py`` (pinned, with the load generator, to
``--client-core``) and ``python3 -m proxy serve`` (pinned to ``--proxy-core``), warms
both paths up, then runs passes alternating direct and proxied, direct first and last
(D P D P D P D; ``--quick``: D P D). Each pass is one ``bench/loadgen.py`` process: a
closed loop with a warm-up and a measurement window, bounded in time and request count.
Each proxied pass is compared with the mean of the direct passes on either side of it
(the machine is shared and drifts), and the table shows the median over proxied passes.

Proxy CPU is utime+stime of the proxy process from ``/proc/<pid>/stat`` at the two ends of
the measurement window, divided by the content chunks (streams) or requests (non-streamed)
the client received in that window. The one-core ceiling is 1 / that CPU.

Everything it starts is stopped at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    concurrency: int
    tokens: int
    ttft_ms: float
    itl_ms: float
    stream: bool
    duration_s: float
    warmup_s: float

    @property
    def unit(self) -> str:
        return "chunk" if self.stream else "req"


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("A", "realistic streaming", 64, 64, 20.0, 20.0, True, 4.0, 1.5),
        Scenario("B64", "streaming stress, 64 streams", 64, 256, 0.0, 0.0, True, 2.5, 1.0),
        Scenario("B256", "streaming stress, 256 streams", 256, 256, 0.0, 0.0, True, 2.5, 1.0),
        Scenario("C", "non-streaming short", 128, 16, 0.0, 0.0, False, 2.5, 1.0),
    )
}


@dataclass(frozen=True, slots=True)
class Target:
    scenario: str
    metric: str  # a key of the scenario summary
    op: str  # "<", "<=", ">="
    limit: float
    kind: str  # "issue" or "stretch"
    label: str

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {"<": value < self.limit, "<=": value <= self.limit, ">=": value >= self.limit}[
            self.op
        ]


TARGETS = (
    Target("A", "added_ttft_p50_ms", "<", 1.0, "issue", "A added TTFT p50 < 1 ms"),
    Target("A", "added_ttft_p99_ms", "<", 5.0, "issue", "A added TTFT p99 < 5 ms"),
    Target("A", "ceiling_per_s", ">=", 20_000, "issue", "A one-core ceiling >= 20k chunks/s"),
    Target("B64", "ceiling_per_s", ">=", 20_000, "issue", "B64 one-core ceiling >= 20k chunks/s"),
    Target("B256", "ceiling_per_s", ">=", 20_000, "issue", "B256 one-core ceiling >= 20k chunks/s"),
    Target("A", "added_ttft_p50_ms", "<=", 0.5, "stretch", "A added TTFT p50 <= 0.5 ms"),
    Target("A", "added_ttft_p99_ms", "<=", 2.0, "stretch", "A added TTFT p99 <= 2 ms"),
    Target("B64", "throughput_ratio", ">=", 0.97, "stretch", "B64 throughput ratio >= 0.97"),
    Target("B256", "throughput_ratio", ">=", 0.97, "stretch", "B256 throughput ratio >= 0.97"),
    Target("B64", "cpu_us_per_unit", "<=", 15.0, "stretch", "B64 CPU per token <= 15 us"),
    Target("B256", "cpu_us_per_unit", "<=", 15.0, "stretch", "B256 CPU per token <= 15 us"),
    Target("C", "cpu_us_per_unit", "<=", 60.0, "stretch", "C CPU per request <= 60 us"),
)


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NICE = 0  # set from --nice: the scheduling priority of everything the benchmark starts


def _pinned(core: int) -> Any:
    def setup() -> None:  # runs in the child, in its own new session
        os.sched_setaffinity(0, {core})
        if NICE:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
            # with sched_autogroup, nice only counts inside a session's group: set the group's
            with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
                f.write(str(NICE))

    return setup


def _child_env(root: Path = ROOT) -> dict[str, str]:
    """The proxy runs with its defaults: no RIGHTSIZER_* overrides from this shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGHTSIZER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def export_rev(rev: str, into: Path) -> Path:
    """A clean copy of the project at a git revision (to measure a commit, not the work tree)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


class Processes:
    """Long-running children (stub, proxy); each is stopped by its pid in ``stop_all``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, cmd: list[str], core: int, root: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the child
        proc = subprocess.Popen(
            cmd, cwd=root, env=_child_env(root), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=_pinned(core), start_new_session=True,  # Ctrl-C is ours to handle
        )  # fmt: skip
        log.close()
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(self.running):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=1.0) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g}s")


def describe_source(rev: str | None) -> str:
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip()

    if rev:
        return f"git {git('rev-parse', '--short', rev)} ({rev})"
    dirty = git("status", "--porcelain", "--", "proxy", "estimator")
    return f"work tree at {git('rev-parse', '--short', 'HEAD')}" + (
        " with uncommitted changes in proxy/ or estimator/" if dirty else ""
    )


# --- one pass ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    proxy_core: int
    client_core: int
    log_dir: Path
    proxy_args: tuple[str, ...]
    proxy_root: Path  # the project tree the proxy runs from


def run_loadgen(
    sc: Scenario, url: str, pids: dict[str, int], setup: Setup, *, warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:  # fmt: skip
    cmd = [
        sys.executable, str(HERE / "loadgen.py"), "--url", url,
        "--concurrency", str(sc.concurrency), "--tokens", str(sc.tokens),
        "--ttft-ms", str(sc.ttft_ms), "--itl-ms", str(sc.itl_ms),
        "--warmup", str(warmup_s), "--duration", str(duration_s),
        "--core", str(setup.client_core),
    ]  # fmt: skip
    if not sc.stream:
        cmd.append("--no-stream")
    for name, pid in pids.items():
        cmd += ["--cpu-pid", f"{name}={pid}"]
    limit = warmup_s + duration_s + sc.ttft_ms / 1e3 + sc.tokens * sc.itl_ms / 1e3 + 30
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_pinned(setup.client_core),
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=limit)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def start_pair(sc: Scenario, procs: Processes, setup: Setup) -> tuple[str, str, dict[str, int]]:
    stub_port, proxy_port = free_port(), free_port()
    stub = procs.start(f"stub-{sc.name}", [
        sys.executable, str(HERE / "stub_backend.py"), "--port", str(stub_port),
        "--ttft-ms", str(sc.ttft_ms), "--itl-ms", str(sc.itl_ms), "--tokens", str(sc.tokens),
    ], setup.client_core)  # fmt: skip
    stub_url = f"http://127.0.0.1:{stub_port}"
    wait_http(stub_url + "/health", stub)
    proxy = procs.start(f"proxy-{sc.name}", [
        sys.executable, "-m", "proxy", "serve", "--backend", stub_url,
        "--host", "127.0.0.1", "--port", str(proxy_port), *setup.proxy_args,
    ], setup.proxy_core, setup.proxy_root)  # fmt: skip
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_http(proxy_url + "/ready", proxy)
    except RuntimeError:
        print(procs.log_tail(f"proxy-{sc.name}"), file=sys.stderr)
        raise
    return stub_url, proxy_url, {"proxy": proxy.pid, "stub": stub.pid}


def run_scenario(
    sc: Scenario, procs: Processes, setup: Setup, proxy_passes: int
) -> list[dict[str, Any]]:
    stub_url, proxy_url, pids = start_pair(sc, procs, setup)
    try:
        for url in (proxy_url, stub_url):  # warm both paths: connections, caches, first calls
            run_loadgen(sc, url, pids, setup, warmup_s=0.5, duration_s=0.5)
        order = ["direct"] + ["proxy", "direct"] * proxy_passes
        passes = []
        for i, mode in enumerate(order):
            time.sleep(0.3)  # let the previous pass's cancelled streams close
            r = run_loadgen(sc, proxy_url if mode == "proxy" else stub_url, pids, setup,
                            warmup_s=sc.warmup_s, duration_s=sc.duration_s)  # fmt: skip
            r["mode"] = mode
            passes.append(r)
            print(f"  {sc.name} pass {i + 1}/{len(order)} {mode:6s} {_pass_line(sc, r)}",
                  flush=True)  # fmt: skip
        return passes
    finally:
        procs.stop_all()


def _pass_line(sc: Scenario, r: dict[str, Any]) -> str:
    t = r["ttft_s"]
    p50 = "-" if t["p50"] is None else f"{t['p50'] * 1e3:.2f}"
    p99 = "-" if t["p99"] is None else f"{t['p99'] * 1e3:.2f}"
    rate = r["chunks_per_s"] if sc.stream else r["requests_per_s"]
    line = f"ttft p50 {p50} p99 {p99} ms, {rate:,.0f} {sc.unit}/s"
    cpu = r["cpu_s"].get("proxy")
    if r["mode"] == "proxy" and cpu is not None and r["chunks"]:
        w = r.get("cpu_wait_s", {}).get("proxy") or 0.0
        line += (f", proxy {cpu / r['chunks'] * 1e6:.1f} us/{sc.unit} (busy "
                 f"{cpu / r['window_s']:.0%}, waited {w / r['window_s']:.0%})")  # fmt: skip
    if r["errors"] or r["short_streams"]:
        line += f", ERRORS {r['errors']} short {r['short_streams']} {r['error_samples'][:2]}"
    return line


# --- summary ---------------------------------------------------------------------------------


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(sc: Scenario, passes: list[dict[str, Any]]) -> dict[str, Any]:
    direct = [p for p in passes if p["mode"] == "direct"]
    proxied = [p for p in passes if p["mode"] == "proxy"]

    def rate(p: dict[str, Any]) -> float:
        return float(p["chunks_per_s"])

    def q(p: dict[str, Any], k: str) -> float | None:
        return _ms(p["ttft_s"][k])

    added50, added99, ratios, cpu, util, core1, waited = [], [], [], [], [], [], []
    for i, p in enumerate(proxied):  # direct[i] ran just before, direct[i + 1] just after
        before, after = direct[i], direct[i + 1]
        for k, out in (("p50", added50), ("p99", added99)):
            b, a, x = q(before, k), q(after, k), q(p, k)
            out.append(None if None in (a, b, x) else x - (a + b) / 2)  # type: ignore[operator]
        base = (rate(before) + rate(after)) / 2
        ratios.append(rate(p) / base if base else None)
        c = p["cpu_s"].get("proxy")
        if c is not None and p["chunks"]:
            cpu.append(c / p["chunks"] * 1e6)
            util.append(c / p["window_s"])
        w = p.get("cpu_wait_s", {}).get("proxy")
        if w is not None:
            waited.append(w / p["window_s"])
        s, g = p["cpu_s"].get("stub"), p["cpu_s"].get("loadgen")
        if s is not None and g is not None:
            core1.append((s + g) / p["window_s"])
    d_core1 = [
        (p["cpu_s"]["stub"] + p["cpu_s"]["loadgen"]) / p["window_s"]
        for p in direct
        if p["cpu_s"].get("stub") is not None
    ]
    cpu_us = _median(cpu)  # type: ignore[arg-type]
    return {
        "unit": sc.unit,
        "direct_ttft_p50_ms": _median([q(p, "p50") for p in direct]),
        "direct_ttft_p99_ms": _median([q(p, "p99") for p in direct]),
        "proxy_ttft_p50_ms": _median([q(p, "p50") for p in proxied]),
        "proxy_ttft_p99_ms": _median([q(p, "p99") for p in proxied]),
        "added_ttft_p50_ms": _median(added50),  # type: ignore[arg-type]
        "added_ttft_p99_ms": _median(added99),  # type: ignore[arg-type]
        "direct_rate_per_s": _median([rate(p) for p in direct]),
        "proxy_rate_per_s": _median([rate(p) for p in proxied]),
        "throughput_ratio": _median(ratios),  # type: ignore[arg-type]
        "direct_drift": rate(direct[-1]) / rate(direct[0]) - 1 if rate(direct[0]) else None,
        "cpu_us_per_unit": cpu_us,
        "ceiling_per_s": None if not cpu_us else 1e6 / cpu_us,
        "proxy_core_util": _median(util),  # type: ignore[arg-type]
        "proxy_cpu_wait": _median(waited),  # type: ignore[arg-type]
        "client_core_util_direct": _median(d_core1),  # type: ignore[arg-type]
        "client_core_util_proxy": _median(core1),  # type: ignore[arg-type]
        "ttft_samples_proxy": sum(p["ttft_s"]["n"] for p in proxied),
        "errors": sum(p["errors"] for p in passes),
        "short_streams": sum(p["short_streams"] for p in passes),
        "per_pass": {
            "added_ttft_p50_ms": added50,
            "added_ttft_p99_ms": added99,
            "throughput_ratio": ratios,
            "cpu_us_per_unit": cpu,
        },
    }


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(scenarios: list[Scenario], summaries: dict[str, dict[str, Any]]) -> str:
    head = (
        "| scenario | direct TTFT p50 / p99 (ms) | added TTFT p50 / p99 (ms) "
        "| direct → proxy rate (/s) | throughput ratio | proxy CPU per 1k chunks (ms) "
        "| one-core ceiling (/s) | proxy busy / waited for CPU "
        "| client core busy (direct / proxy) |"
    )
    rows = [head, "|" + "---|" * 9]
    for sc in scenarios:
        s = summaries[sc.name]
        name = f"{sc.name}: {sc.concurrency} x {sc.tokens}" + (
            f", TTFT/ITL {sc.ttft_ms:g}/{sc.itl_ms:g} ms" if sc.ttft_ms or sc.itl_ms else ""
        )
        unit = sc.unit + "s"
        if sc.stream:
            cpu = f"{_f(s['cpu_us_per_unit'], '.1f')} ({_f(s['cpu_us_per_unit'], '.1f')} µs/chunk)"
        else:
            cpu = f"n/a ({_f(s['cpu_us_per_unit'], '.0f')} µs/request)"
        rows.append(
            f"| {name} "
            f"| {_f(s['direct_ttft_p50_ms'], '.2f')} / {_f(s['direct_ttft_p99_ms'], '.2f')} "
            f"| {_f(s['added_ttft_p50_ms'], '+.2f')} / {_f(s['added_ttft_p99_ms'], '+.2f')} "
            f"| {_f(s['direct_rate_per_s'], ',.0f')} → {_f(s['proxy_rate_per_s'], ',.0f')} {unit} "
            f"| {_f(s['throughput_ratio'], '.3f')} "
            f"| {cpu} "
            f"| {_f(s['ceiling_per_s'], ',.0f')} {unit} "
            f"| {_f(s['proxy_core_util'], '.0%')} / {_f(s['proxy_cpu_wait'], '.0%')} "
            f"| {_f(s['client_core_util_direct'], '.0%')} / "
            f"{_f(s['client_core_util_proxy'], '.0%')} |"
        )
    return "\n".join(rows)


def check_targets(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        if t.scenario not in summaries:
            continue
        value = summaries[t.scenario][t.metric]
        ok = t.check(value)
        out.append({**asdict(t), "value": value,
                    "result": "n/a" if ok is None else ("PASS" if ok else "FAIL")})  # fmt: skip
    for name, s in summaries.items():
        if s["errors"] or s["short_streams"]:
            out.append({"scenario": name, "kind": "sanity", "label": f"{name} no errors",
                        "value": s["errors"] + s["short_streams"], "result": "FAIL"})  # fmt: skip
    return out


def _fmt_target(t: dict[str, Any]) -> str:
    v = t["value"]
    shown = "n/a" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")
    return f"  {t['result']:4s}  [{t['kind']}] {t['label']}: {shown}"


# --- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="D P D with short windows (~1 min)")
    p.add_argument("--scenarios", default="A,B64,B256,C", help="comma list of A,B64,B256,C")
    p.add_argument("--passes", type=int, help="proxied passes per scenario (default 3; quick 1)")
    p.add_argument("--json", metavar="PATH", help="write passes, summaries and targets here")
    p.add_argument("--proxy-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1, help="for the stub and load generator")
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for 'proxy serve' (repeatable)")  # fmt: skip
    p.add_argument("--nice", type=int, default=0,
                   help="priority for the stub, proxy and load generator (e.g. -10 as root, "
                        "on a machine busy with other work)")  # fmt: skip
    p.add_argument("--rev", help="measure the proxy at this git revision (default: work tree)")
    p.add_argument("--proxy-src", type=Path, help="or run the proxy from this project tree")
    p.add_argument("--keep-logs", action="store_true", help="print where the logs are kept")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    cores = os.sched_getaffinity(0)
    if {args.proxy_core, args.client_core} - cores or args.proxy_core == args.client_core:
        print(f"need two distinct usable cores; have {sorted(cores)}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.client_core})  # this driver never runs on the proxy's core
    global NICE
    NICE = args.nice
    scenarios = [SCENARIOS[n] for n in names]
    if args.quick:
        scenarios = [
            replace(s, duration_s=2.0 if s.name == "A" else 1.5, warmup_s=min(s.warmup_s, 1.0))
            for s in scenarios
        ]
    proxy_passes = args.passes or (1 if args.quick else 3)
    log_dir = Path(tempfile.mkdtemp(prefix="rightsizer-bench-"))
    proxy_root = args.proxy_src.resolve() if args.proxy_src else ROOT
    if args.rev:
        proxy_root = export_rev(args.rev, log_dir / "src")
    setup = Setup(args.proxy_core, args.client_core, log_dir, tuple(args.proxy_arg), proxy_root)
    procs = Processes(log_dir)
    source = describe_source(args.rev) if not args.proxy_src else f"tree {proxy_root}"
    print(f"proxy: {source}", flush=True)
    started = time.monotonic()
    ok = False
    all_passes: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    try:
        with sigterm_as_interrupt():
            for sc in scenarios:
                print(f"{sc.name}: {sc.title} ({sc.concurrency} concurrent, {sc.tokens} tokens, "
                      f"{'stream' if sc.stream else 'no stream'})", flush=True)  # fmt: skip
                all_passes[sc.name] = run_scenario(sc, procs, setup, proxy_passes)
                summaries[sc.name] = summarize(sc, all_passes[sc.name])
        ok = True
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep_logs or not ok:
            print(f"logs: {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    targets = check_targets(summaries)
    mode = "quick" if args.quick else "full"
    print(f"\nproxy overhead ({mode}, {proxy_passes} proxied passes per scenario, medians; "
          f"{elapsed:.0f} s; proxy on core {args.proxy_core}, stub + client on core "
          f"{args.client_core}; proxy: {source})\n")  # fmt: skip
    print(table(scenarios, summaries))
    print("\nC is non-streamed: its rates are requests/s and its CPU is per request.")
    print("\ntargets:")
    for t in targets:
        print(_fmt_target(t))
    if args.json:
        doc = {
            "mode": mode, "elapsed_s": elapsed, "proxy_source": source,
            "proxy_passes": proxy_passes, "nice": args.nice,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "load_avg": os.getloadavg()},
            "scenarios": {sc.name: {"params": asdict(sc), "summary": summaries[sc.name],
                                    "passes": all_passes[sc.name]} for sc in scenarios},
            "targets": targets,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))
    failed = [t for t in targets if t["result"] == "FAIL" and t["kind"] != "stretch"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
