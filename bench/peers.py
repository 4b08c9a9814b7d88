"""rightsizer beside the peer gateways, in the peer harness (``../shared/peers``): one run, one
machine, the same mock engine and load generator for everyone.

    bash ../shared/peers/setup_peers.sh            # once: nginx, vllm-router, smg venvs
    python3 bench/peers.py                         # A, B, C; direct, nginx, vllm-router (rr),
                                                   # smg, rightsizer 1 worker, 2 workers
    python3 bench/peers.py --quick                 # a smoke run (durations x 0.25)

rightsizer runs from this checkout (``python3 -m proxy serve``), with its defaults (prefix
routing, scheduling, the estimator in its own process, metrics), in three configurations:
``rightsizer`` (one worker), ``rightsizer-nosched`` (one worker, scheduling off: the
forwarding cost alone, as the routers that hold no queue) and ``rightsizer-2w`` (two workers;
the harness gives the proxy the cores in ``--proxy-cores``, so on a 2-core machine the
workers share the proxy's core with nothing, or, with ``--proxy-cores 0,1``, the cores with
the engine and the load generator: see bench/README.md for what that can and cannot show).

The harness writes ``tables.md`` and ``results.json`` under ``--out``; this script prints the
tables. Absolute numbers move between machines; ratios to direct and to nginx in the same run
are what count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT.parent / "shared" / "peers" / "run_peers.py"


def rightsizer_peers() -> list[dict[str, object]]:
    env = {"PYTHONPATH": str(ROOT), "RIGHTSIZER_GPU__ENABLED": "false"}
    base = f"{sys.executable} -m proxy serve --host 127.0.0.1 --port {{port}} --backend {{backend}}"

    def peer(name: str, extra: str, notes: str, **more_env: str) -> dict[str, object]:
        return {
            "name": name,
            "cmd": f"{base} {extra}".strip(),
            "url": "http://127.0.0.1:{port}",
            "env": {**env, **more_env},
            "ready_timeout": 60,
            "notes": notes,
        }

    nosched = {"RIGHTSIZER_SCHEDULING__ENABLED": "false"}
    return [
        peer("rightsizer", "--workers 1", "defaults, one worker"),
        peer("rightsizer-nosched", "--workers 1", "one worker, scheduling off", **nosched),
        peer("rightsizer-2w", "--workers 2", "defaults, two workers"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="durations x 0.25")
    p.add_argument("--duration-scale", type=float, help="durations x this (default 1)")
    p.add_argument("--scenarios", default="A,B,C")
    p.add_argument("--peers", default="direct,nginx,vllm-router-rr,smg,rightsizer,"
                   "rightsizer-nosched,rightsizer-2w")  # fmt: skip
    p.add_argument("--venvs", default="/tmp/bench-venvs")
    p.add_argument("--out", default=str(ROOT / "out" / "peers"))
    p.add_argument("--proxy-cores", help="passed to the harness (default: its own, core 1)")
    p.add_argument("--reverse", action="store_true", help="the harness's second-pass order")
    args = p.parse_args(argv)
    if not HARNESS.exists():
        print(f"no peer harness at {HARNESS}", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rightsizer_peers(), f)
    cmd = [sys.executable, str(HARNESS), "--peer-file", f.name, "--peers", args.peers,
           "--scenarios", args.scenarios, "--venvs", args.venvs, "--out", args.out,
           "--python", f"{args.venvs}/harness/bin/python"]  # fmt: skip
    if args.quick or args.duration_scale:
        cmd += ["--duration-scale", str(args.duration_scale or 0.25)]
    if args.proxy_cores:
        cmd += ["--proxy-cores", args.proxy_cores]
    if args.reverse:
        cmd.append("--reverse")
    run = subprocess.run(cmd)
    tables = sorted(Path(args.out).glob("*/tables.md"), key=lambda t: t.stat().st_mtime)
    if tables:
        print(tables[-1].read_text())
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
