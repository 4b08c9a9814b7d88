"""``rightsizer``: argument parsing and start-up only.

rightsizer serve     run the proxy in front of OpenAI-compatible backends
rightsizer emulate   run an emulated engine (no GPU needed)
rightsizer demo      two emulated engines + the proxy + a short traffic run, then a report
rightsizer estimate  offline projection from a model config.json and a traffic profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy.app import Deps
from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.errors import JsonErrorRunner

log = logging.getLogger("rightsizer")


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def run_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    grace_s: float = 10.0,
    access_log: bool = False,
    max_field_size: int = 16 * 1024,
    max_headers: int = 128,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests for up to ``grace_s``.

    ``handler_cancellation``: a client that disconnects cancels its handler at once, which
    closes the upstream request (the engine must not keep generating for nobody).
    """
    runner = JsonErrorRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=grace_s,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        max_field_size=max_field_size,
        max_line_size=max_field_size,
        max_headers=max_headers,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    log.info("listening on http://%s:%d", host, port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()


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
    return over


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides=_serve_overrides(args))
    except ConfigError as exc:
        print(f"rightsizer: config error: {exc}", file=sys.stderr)
        return 2
    if not config.backends:
        print(
            "rightsizer: no backends: give --backend URL or a config with backends:",
            file=sys.stderr,
        )
        return 2
    from proxy.programs.wiring import estimator_deps

    try:
        deps = estimator_deps(config, args.config or "flags")
    except ConfigError as exc:
        print(f"rightsizer: config error: {exc}", file=sys.stderr)
        return 2
    loop_name = _install_uvloop()
    log.info("event loop: %s; backends: %s", loop_name, ", ".join(b.url for b in config.backends))
    asyncio.run(_serve(config, deps))
    return 0


async def _serve(config: ProxyConfig, deps: Deps) -> None:
    from proxy.app import build_app

    app = build_app(config, deps)
    # Long-lived start-up objects leave the GC's view, and young-generation collections run
    # less often: per-request garbage is short-lived and mostly acyclic (measured: the GC
    # took 11-13% of the proxy's CPU on short non-streamed requests).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    srv = config.server
    await run_site(
        app, srv.host, srv.port, grace_s=srv.shutdown_grace_s,
        max_field_size=srv.max_header_bytes, max_headers=srv.max_headers,
    )  # fmt: skip


def cmd_emulate(args: argparse.Namespace) -> int:
    from proxy.programs.emulator import EmulatorServer
    from proxy.programs.wiring import emulator_from_args

    cfg, timing = emulator_from_args(args)
    _install_uvloop()
    server = EmulatorServer(cfg, timing)
    asyncio.run(run_site(server.app(), args.host, args.port, grace_s=1.0))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.programs.demo import run_demo

    _install_uvloop()
    return asyncio.run(run_demo(duration_s=args.duration, requests=args.requests, seed=args.seed))


def cmd_estimator(args: argparse.Namespace) -> int:
    from proxy.programs.estimator_server import build_estimator_app
    from proxy.programs.wiring import build_estimator

    try:
        config = load_config(args.config)
        est = build_estimator(config, args.config or "flags")
    except ConfigError as exc:
        print(f"rightsizer: config error: {exc}", file=sys.stderr)
        return 2
    redis_url = args.redis_url or config.shared.redis_url
    if not redis_url:
        print("rightsizer: estimator needs --redis-url (or shared.redis_url)", file=sys.stderr)
        return 2
    stream = f"{config.shared.key_prefix}:records"
    _install_uvloop()
    app = build_estimator_app(est, redis_url, stream, args.from_start)
    asyncio.run(run_site(app, args.host, args.port, grace_s=2.0))
    return 0


def cmd_gpu_exporter(args: argparse.Namespace) -> int:
    from proxy.programs.gpu_exporter import build_exporter_app

    _install_uvloop()
    asyncio.run(run_site(build_exporter_app(args.interval), args.host, args.port, grace_s=1.0))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from estimator.cli import run_estimate

    return run_estimate(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rightsizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Precedence: flags > RIGHTSIZER_* env vars > config file.",
    )
    s.add_argument("--config", help="YAML config (see configs/proxy.yaml)")
    s.add_argument("--backend", action="append", help="backend base URL (repeatable)")
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default 8080)")
    s.add_argument("--request-log", help="write a JSON-lines request log here")
    s.add_argument("--redis-url", help="share state with other replicas, e.g. redis://host:6379/0")
    s.add_argument("--routing", help="round_robin, least_loaded, prefix (default) or session")
    s.add_argument("--no-estimator", action="store_true", help="don't run the online estimator")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("emulate", help="run an emulated OpenAI-compatible engine")
    from proxy.programs.wiring import add_emulator_arguments

    add_emulator_arguments(e)
    e.set_defaults(func=cmd_emulate)

    d = sub.add_parser("demo", help="self-contained demo: emulated engines, proxy, traffic, report")
    d.add_argument("--duration", type=float, default=40.0, help="traffic duration in seconds")
    d.add_argument("--requests", type=int, default=2000, help="maximum requests to send")
    d.add_argument("--seed", type=int, default=7, help="seed of the traffic schedule (default 7)")
    d.set_defaults(func=cmd_demo)

    x = sub.add_parser(
        "estimator",
        help="run the online estimator alone, fed by the proxies' Redis records stream",
    )
    x.add_argument("--config", help="YAML config (its estimator and shared sections are used)")
    x.add_argument("--redis-url", help="Redis holding the records stream")
    x.add_argument("--host", default="127.0.0.1")
    x.add_argument("--port", type=int, default=9100)
    x.add_argument("--from-start", action="store_true", help="replay the stream from its start")
    x.set_defaults(func=cmd_estimator)

    g = sub.add_parser(
        "gpu-exporter",
        help="serve this node's GPU samples (pynvml) as rightsizer_gpu_* metrics, beside an engine",
    )
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=9400)
    g.add_argument("--interval", type=float, default=5.0, help="sampling period, seconds")
    g.set_defaults(func=cmd_gpu_exporter)

    est = sub.add_parser("estimate", help="offline projection from a model config and traffic")
    try:
        from estimator.cli import add_estimate_arguments
    except ImportError:  # the estimator CLI is optional at build time of this parser
        est.set_defaults(func=lambda a: (print("estimator CLI unavailable", file=sys.stderr), 2)[1])
    else:
        add_estimate_arguments(est)
        est.set_defaults(func=cmd_estimate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
