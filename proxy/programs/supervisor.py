"""``rightsizer serve --workers N`` (N > 1): one supervisor, N worker processes, one estimator.

The supervisor checks that the port is free (a plain bind: a second rightsizer on the same
port must fail, not silently share it), makes the run folder and the shared-memory segment
(``proxy.shm``), starts the machine's one estimator process (records arrive on its unix
socket from every worker) and the workers (``proxy.programs.worker``), each listening on the
same port with SO_REUSEPORT, so the kernel spreads connections over them.

A worker that dies is restarted (its shared-memory block zeroed first: its requests are
gone), with a back-off. SIGTERM/SIGINT go to every worker, which drain as one process does
(``server.shutdown_grace_s``); the supervisor waits for them, then stops the estimator and
removes the segment and the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.config import ProxyConfig
from proxy.shm import clear_block, create, destroy

log = logging.getLogger("rightsizer.supervisor")


def port_free(host: str, port: int) -> str | None:
    """None when ``host:port`` can be listened on, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


class Supervisor:
    def __init__(self, config: ProxyConfig, workers: int, log_level: str) -> None:
        self.config, self.n, self.log_level = config, workers, log_level
        self.folder = Path(tempfile.mkdtemp(prefix="rightsizer-run-"))
        self.shm_name = f"rightsizer-{os.getpid()}-{os.urandom(3).hex()}"
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.backoff = [1.0] * workers
        self.estimator: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def run(self) -> int:
        srv = self.config.server
        busy = port_free(srv.host, srv.port)
        if busy is not None:
            print(f"rightsizer: {busy}", file=sys.stderr)
            return 2
        (self.folder / "config.pickle").write_bytes(pickle.dumps(self.config))
        segment = create(self.shm_name, self.n, len(self.config.backends), len(self.config.tenants))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            if self.config.estimator.enabled:
                self._start_estimator()
            for i in range(self.n):
                self._start(i)
            log.info("%d workers on http://%s:%d (SO_REUSEPORT)", self.n, srv.host, srv.port)
            self._watch(segment)
        finally:
            self._stop_all()
            destroy(segment)
            shutil.rmtree(self.folder, ignore_errors=True)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _start_estimator(self) -> None:
        from proxy.programs.wiring import build_estimator, experiments_spec

        est = build_estimator(self.config)
        self.estimator = subprocess.Popen(
            [sys.executable, "-m", "proxy.programs.estimator_worker", "--serve", str(self.folder)],
            stdin=subprocess.PIPE,
        )
        payload = pickle.dumps((est.config, experiments_spec(self.config)))
        assert self.estimator.stdin is not None
        self.estimator.stdin.write(struct.pack("!I", len(payload)) + payload)
        self.estimator.stdin.flush()

    def _start(self, i: int) -> None:
        cmd = [sys.executable, "-m", "proxy.programs.worker", "--folder", str(self.folder),
               "--index", str(i), "--count", str(self.n), "--shm", self.shm_name,
               "--log-level", self.log_level]  # fmt: skip
        self.procs[i] = subprocess.Popen(cmd)

    def _watch(self, segment: object) -> None:
        restart_at: dict[int, float] = {}
        while not self.stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for i, p in enumerate(self.procs):
                if self.stopping:  # the group got the signal too: workers are draining
                    return
                if p is not None and p.poll() is not None:
                    log.error("worker %d exited (%s); restarting in %.0fs", i, p.returncode,
                              self.backoff[i])  # fmt: skip
                    clear_block(segment, i)  # type: ignore[arg-type]
                    self.procs[i] = None
                    restart_at[i] = now + self.backoff[i]
                    self.backoff[i] = min(30.0, self.backoff[i] * 2)
            for i, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[i]
                    self._start(i)

    def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace_s + 5.0
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.estimator is not None:
            with contextlib.suppress(OSError):
                assert self.estimator.stdin is not None
                self.estimator.stdin.close()
            try:
                self.estimator.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.estimator.kill()
                self.estimator.wait()
