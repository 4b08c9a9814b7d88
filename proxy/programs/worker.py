"""One worker of ``rightsizer serve --workers N`` (started by ``proxy.programs.supervisor``).

It serves the proxy on the shared port (SO_REUSEPORT) and on its private unix socket (for the
aggregated /metrics), shares in-flight counts, tenant usage and prefix decisions with the
other workers through shared memory, and sends its records to the machine's one estimator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pickle
from pathlib import Path

from proxy.app import Deps, WorkerSlot
from proxy.config import ProxyConfig
from proxy.estimation import SocketEstimator
from proxy.gpu import GpuSampler
from proxy.programs.cli import _install_uvloop, serve_app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rightsizer-worker")
    p.add_argument("--folder", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--shm", required=True)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s w{args.index} %(name)s: %(message)s",
    )
    config: ProxyConfig = pickle.loads(Path(args.folder, "config.pickle").read_bytes())
    slot = WorkerSlot(index=args.index, count=args.count, shm=args.shm, folder=args.folder)
    deps = Deps(
        estimator=SocketEstimator(args.folder) if config.estimator.enabled else None,
        gpu=GpuSampler() if config.gpu.enabled and args.index == 0 else None,
        worker=slot,
    )
    _install_uvloop()
    asyncio.run(serve_app(config, deps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
