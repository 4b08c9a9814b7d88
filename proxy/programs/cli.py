"""rightsizer: an instrumenting, OpenAI-compatible LLM proxy with an online capacity and cost
estimator.

commands:
  serve         run the proxy in front of OpenAI-compatible backends
  emulate       run an emulated inference engine (no GPU needed)
  demo          two emulated engines, the proxy and a short traffic run, then a report
  estimate      offline projection from a model config.json and a traffic profile
  estimator     run the online estimator alone, fed by the proxies' Redis records stream
  gpu-exporter  serve this node's GPU samples as metrics, beside an engine
  compare       an experiment's verdict: two groups' latency, errors, capacity and cost
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy.app import Deps
from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.server import GuardedRunner, Guards
from proxy.upstream.relay import Drain

log = logging.getLogger("rightsizer")


class ListenError(OSError):
    """The listening socket could not be opened (the port is taken, the address is wrong)."""


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    grace_s: float = 10.0,
    drain: Drain | None = None,
    drain_delay_s: float = 0.0,
    guards: Guards | None = None,
    access_log: bool = False,
    max_field_size: int = 16 * 1024,
    max_headers: int = 128,
    reuse_port: bool = False,
    unix_path: str | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (``shutdown``). ``reuse_port``:
    share the port with the other workers; ``unix_path``: also listen there (the workers'
    private socket, for the aggregated /metrics).

    ``handler_cancellation``: a client that disconnects cancels its handler at once, which
    closes the upstream request (the engine must not keep generating for nobody).
    """
    runner = GuardedRunner(
        app,
        guards=guards,
        handler_cancellation=True,
        shutdown_timeout=1.0,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        max_field_size=max_field_size,
        max_line_size=max_field_size,
        max_headers=max_headers,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None
    )
    try:
        await site.start()
        if unix_path is not None:
            await web.UnixSite(runner, unix_path).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    where = " (all interfaces)" if host in ("0.0.0.0", "::") else ""
    log.info("listening on http://%s:%d%s", host, port, where)
    try:
        await stop.wait()
    finally:
        await shutdown(runner, drain, grace_s=grace_s, drain_delay_s=drain_delay_s)


async def shutdown(
    runner: web.AppRunner, drain: Drain | None, *, grace_s: float, drain_delay_s: float = 0.0
) -> None:
    """Graceful stop, the grace counted once from now.

    1. ``/ready`` answers 503 at once (load balancers stop sending) while the listener stays
       open: requests still arriving are served; 2. the listener closes when nothing is in
       flight (after ``drain_delay_s`` at least), or when the grace ends; 3. requests still
       running then end with an error (streams: a final SSE ``error`` event, code
       ``shutdown``; others: 503), each recorded as ``shutdown``; 4. the app's resources close.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    log.info("shutting down (grace %.0fs)", grace_s)
    if drain is not None:
        drain.draining = True
        await _idle(drain, deadline, at_least_until=loop.time() + min(drain_delay_s, grace_s))
    elif drain_delay_s > 0:
        await asyncio.sleep(min(drain_delay_s, grace_s))
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    if drain is not None:
        await _idle(drain, deadline)
        if drain.tasks:
            log.warning(
                "shutdown grace ran out with %d request(s) in flight; ending them",
                len(drain.tasks),
            )
            drain.expired = True
            for task in list(drain.tasks):
                task.cancel()
            await _idle(drain, loop.time() + 2.0)
    await runner.cleanup()


async def _idle(drain: Drain, deadline: float, at_least_until: float = 0.0) -> None:
    """Wait until nothing is in flight (and ``at_least_until`` passed), or ``deadline``."""
    loop = asyncio.get_running_loop()
    while (drain.tasks or loop.time() < at_least_until) and loop.time() < deadline:
        await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    server = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if server:
        over["server"] = server
    if args.backend:
        over["backends"] = [{"url": u} for u in args.backend]
    if args.request_log:
        over["request_log"] = {"path": args.request_log}
    if args.redis_url:
        over["shared"] = {"redis_url": args.redis_url}
    if args.routing:
        over["routing"] = {"policy": args.routing}
    if args.no_estimator:
        over["estimator"] = {"enabled": False}
    if args.workers is not None:
        over.setdefault("server", {})["workers"] = args.workers
    return over


def _fail(message: str) -> int:
    print(f"rightsizer: {message}", file=sys.stderr)
    return 2


def check_exposure(config: ProxyConfig, source: str) -> None:
    """Refuse to open the admin endpoints to a network without a token."""
    srv = config.server
    if srv.admin_token is None and not srv.allow_open_admin and not is_loopback(srv.host):
        raise ConfigError(
            source,
            "server.admin_token",
            f"required when listening on {srv.host} (not a loopback address): /admin/* would "
            "be open to anyone who reaches the port. Set RIGHTSIZER_SERVER__ADMIN_TOKEN, or "
            "server.allow_open_admin: true to accept that.",
        )


def cmd_serve(args: argparse.Namespace) -> int:
    source = args.config or "flags"
    try:
        config = load_config(args.config, overrides=_serve_overrides(args))
        check_exposure(config, source)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    if not config.backends:
        return _fail("no backends: give --backend URL or a config with backends:")
    from proxy.programs.wiring import build_estimator, estimator_deps

    workers = worker_count(config)
    log.info("backends: %s; workers: %d", ", ".join(b.url for b in config.backends), workers)
    try:
        if workers > 1:
            from proxy.app import check_config
            from proxy.programs.supervisor import Supervisor

            check_config(config, source)  # a bad config fails here, naming its key
            if config.estimator.enabled:
                build_estimator(config, source)
            return Supervisor(config, workers, args.log_level).run()
        deps = estimator_deps(config, source, in_process=args.estimator_in_process)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    _install_uvloop()
    try:
        asyncio.run(serve_app(config, deps))
    except ListenError as exc:
        return _fail(str(exc.strerror))
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    return 0


def worker_count(config: ProxyConfig) -> int:
    """``server.workers``, or one per core this process may run on (its CPU affinity, as
    ``taskset`` or a container's cpuset sets it; at most 8) when it is 0."""
    n = config.server.workers
    return n if n > 0 else max(1, min(8, usable_cores()))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


async def serve_app(config: ProxyConfig, deps: Deps) -> None:
    """Build the proxy app and serve it until SIGTERM (one process, or one worker)."""
    from proxy.app import build_app
    from proxy.handlers import PROXY

    app = build_app(config, deps)
    # Long-lived start-up objects leave the GC's view, and young-generation collections run
    # less often: per-request garbage is short-lived and mostly acyclic (measured: the GC
    # took 11-13% of the proxy's CPU on short non-streamed requests).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    srv = config.server
    metrics = app[PROXY].recorder.metrics
    guards = Guards(
        header_timeout_s=srv.header_timeout_s,
        keepalive_s=srv.keepalive_s,
        max_connections=srv.max_connections,
        on_reject=lambda reason: metrics.client_errors.labels(reason).inc(),
    )
    worker = deps.worker
    await run_site(
        app, srv.host, srv.port, grace_s=srv.shutdown_grace_s, drain=app[PROXY].drain,
        drain_delay_s=srv.drain_delay_s, guards=guards,
        max_field_size=srv.max_header_bytes, max_headers=srv.max_headers,
        reuse_port=worker is not None,
        unix_path=worker.socket(worker.index) if worker is not None else None,
    )  # fmt: skip


def cmd_emulate(args: argparse.Namespace) -> int:
    from proxy.programs.emulator import EmulatorServer
    from proxy.programs.wiring import emulator_from_args

    cfg, timing = emulator_from_args(args)
    _install_uvloop()
    server = EmulatorServer(cfg, timing)
    log.info("emulating: %s", server.describe())
    try:
        asyncio.run(run_site(server.app(), args.host, args.port, grace_s=1.0))
    except ListenError as exc:
        return _fail(str(exc.strerror))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.programs.demo import run_demo

    _install_uvloop()
    return asyncio.run(run_demo(duration_s=args.duration, requests=args.requests, seed=args.seed))


def cmd_estimator(args: argparse.Namespace) -> int:
    from proxy.estimation import InProcessEstimator
    from proxy.programs.estimator_server import build_estimator_app
    from proxy.programs.wiring import build_estimator

    source = args.config or "flags"
    try:
        config = load_config(args.config, overrides={"server": {"host": args.host}})
        check_exposure(config, source)
        est = build_estimator(config, source)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    redis_url = args.redis_url or config.shared.redis_url
    if not redis_url:
        return _fail("estimator needs --redis-url (or shared.redis_url)")
    stream = f"{config.shared.key_prefix}:records"
    _install_uvloop()
    runner = InProcessEstimator(est, config.estimator.refresh_interval_s)
    app = build_estimator_app(
        runner, redis_url, stream, args.from_start, admin_token=config.server.admin_token
    )
    try:
        asyncio.run(run_site(app, args.host, args.port, grace_s=2.0))
    except ListenError as exc:
        return _fail(str(exc.strerror))
    return 0


def cmd_gpu_exporter(args: argparse.Namespace) -> int:
    from proxy.programs.gpu_exporter import build_exporter_app

    _install_uvloop()
    try:
        asyncio.run(run_site(build_exporter_app(args.interval), args.host, args.port, grace_s=1.0))
    except ListenError as exc:
        return _fail(str(exc.strerror))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from estimator.cli import run_estimate

    return run_estimate(args)


def cmd_compare(args: argparse.Namespace) -> int:
    """Offline from request logs, or live from a proxy's /admin/experiments."""
    import urllib.error
    import urllib.request

    import orjson

    from estimator import compare_cli
    from proxy.programs.wiring import experiments_spec

    if args.url:
        req = urllib.request.Request(args.url.rstrip("/") + "/admin/experiments")
        if args.admin_token:
            req.add_header("Authorization", f"Bearer {args.admin_token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = orjson.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return _fail(f"compare: {args.url}: {exc}")
        verdicts = [
            e["verdict"]
            for e in data.get("experiments", [])
            if args.experiment in (None, e["name"]) and "experiment" in e["verdict"]
        ]
        compare_cli.emit(verdicts, args.json)
        return 0
    if not args.logs or len(args.logs) > 2:
        return _fail("compare: give one or two request logs, or --url")
    spec, slo, model_configs, catalog = None, args.slo, {}, None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return _fail(f"config error: {exc}")
        spec = experiments_spec(config)
        model_configs, catalog = dict(config.estimator.model_configs), config.estimator.catalog
        if slo is None:
            from estimator.capacity import Slo

            slo = Slo(
                ttft_p95_s=config.estimator.slo_ttft_p95_s, itl_p95_s=config.estimator.slo_itl_p95_s
            )
    try:
        verdict = compare_cli.offline(
            args.logs,
            spec=spec,
            groups=args.group or (),
            slo=slo or compare_cli.Slo(),
            experiment=args.experiment,
            baseline=args.baseline,
            candidate=args.candidate,
            rate_rps=args.rate,
            model_configs=model_configs,
            catalog_path=catalog,
        )
    except (OSError, ValueError) as exc:
        return _fail(f"compare: {exc}")
    compare_cli.emit([verdict], args.json)
    return 0


def _add_compare(sub: Any) -> None:
    from estimator.cli import parse_slo
    from estimator.compare_cli import __doc__ as doc
    from estimator.compare_cli import parse_group

    c = sub.add_parser(
        "compare",
        help="an experiment's verdict: latency, errors, capacity, cost",
        formatter_class=_Help,
        description=doc,
    )
    c.add_argument(
        "logs",
        nargs="*",
        metavar="LOG",
        help="request log(s): one with both groups, or the baseline's and the candidate's",
    )
    c.add_argument("--url", help="a proxy: read its live verdicts from /admin/experiments")
    c.add_argument("--admin-token", help="the proxy's server.admin_token")
    c.add_argument("--config", help="proxy config: its groups, experiments, SLO, model configs")
    c.add_argument("--experiment", help="which experiment (default: the first)")
    c.add_argument("--baseline", help="the baseline group's name")
    c.add_argument("--candidate", help="the candidate group's name")
    c.add_argument(
        "--group",
        action="append",
        type=parse_group,
        metavar="NAME:k=v,...",
        help="a group's description: gpu=, count=, quant=, max_num_seqs=, "
        "usd_per_hour=, or input= and output= ($/1M tokens, managed)",
    )
    c.add_argument(
        "--slo",
        type=parse_slo,
        default=None,
        metavar="ttft_p95=S,itl_p95=S",
        help="the SLO (default: the config's, else 1.0 s and 0.1 s)",
    )
    c.add_argument("--rate", type=float, help="price at this rate (req/s; default: the logs')")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_compare)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the descriptions' line breaks."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rightsizer", description=__doc__, formatter_class=_Help)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO or WARNING")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the proxy",
        formatter_class=_Help,
        description="Run the proxy in front of OpenAI-compatible backends.\n"
        "Precedence: flags > RIGHTSIZER_<SECTION>__<KEY> env vars > config file > defaults.",
    )
    s.add_argument("--config", help="YAML config (see configs/proxy.yaml)")
    s.add_argument("--backend", action="append", help="backend base URL (repeatable)")
    s.add_argument("--host", help="listen address (config default: 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (config default: 8080)")
    s.add_argument("--request-log", help="write a JSON-lines request log to this file")
    s.add_argument("--redis-url", help="share state with other replicas, e.g. redis://host:6379/0")
    s.add_argument("--routing", help="round_robin, least_loaded, prefix (default) or session")
    s.add_argument("--no-estimator", action="store_true", help="don't run the online estimator")
    s.add_argument(
        "--workers", type=int, help="worker processes (config default 0: one per core, max 8)"
    )
    s.add_argument(
        "--estimator-in-process",
        action="store_true",
        help="refresh the estimator in a thread of the proxy's process instead of its own "
        "process (for comparison: it then shares the proxy's interpreter lock)",
    )
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser(
        "emulate",
        help="run an emulated OpenAI-compatible engine",
        formatter_class=_Help,
        description="An OpenAI-compatible emulated engine with continuous batching, "
        "max_num_seqs, a KV-cache limit with preemption, a prefix cache, usage chunks and "
        "vLLM-named /metrics, for trying the proxy without a GPU.",
    )
    from proxy.programs.wiring import add_emulator_arguments

    add_emulator_arguments(e)
    e.set_defaults(func=cmd_emulate)

    d = sub.add_parser(
        "demo",
        help="self-contained demo: emulated engines, proxy, traffic, report",
        formatter_class=_Help,
        description="Start two emulated engines and the proxy on loopback ports, send a short "
        "traffic ramp through the proxy, and report what it measured and projected.",
    )
    d.add_argument("--duration", type=float, default=40.0, help="traffic duration in seconds")
    d.add_argument("--requests", type=int, default=2000, help="maximum requests to send")
    d.add_argument("--seed", type=int, default=7, help="seed of the traffic schedule")
    d.set_defaults(func=cmd_demo)

    x = sub.add_parser(
        "estimator",
        help="run the online estimator alone, fed by the proxies' Redis records stream",
        formatter_class=_Help,
        description="The online estimator as its own process: reads the RequestRecords every "
        "proxy replica publishes to Redis and serves /metrics and /admin/estimator.",
    )
    x.add_argument("--config", help="YAML config (its estimator and shared sections are used)")
    x.add_argument("--redis-url", help="Redis holding the records stream")
    x.add_argument("--host", default="127.0.0.1", help="listen address")
    x.add_argument("--port", type=int, default=9100, help="listen port")
    x.add_argument("--from-start", action="store_true", help="replay the stream from its start")
    x.set_defaults(func=cmd_estimator)

    g = sub.add_parser(
        "gpu-exporter",
        help="serve this node's GPU samples (pynvml) as rightsizer_gpu_* metrics",
        formatter_class=_Help,
        description="Serve this node's NVIDIA GPU samples as rightsizer_gpu_* metrics, beside "
        "an engine on a node without a proxy (backends[].gpu_metrics_url reads them). It "
        "listens on all interfaces by default, for the proxy on another node to scrape.",
    )
    g.add_argument("--host", default="0.0.0.0", help="listen address (all interfaces)")
    g.add_argument("--port", type=int, default=9400, help="listen port")
    g.add_argument("--interval", type=float, default=5.0, help="sampling period, seconds")
    g.set_defaults(func=cmd_gpu_exporter)

    est = sub.add_parser(
        "estimate",
        help="offline projection from a model config and traffic",
        formatter_class=_Help,
    )
    from estimator.cli import add_estimate_arguments

    add_estimate_arguments(est)
    est.set_defaults(func=cmd_estimate)
    _add_compare(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
