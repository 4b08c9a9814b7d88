"""A redis-server of a test's own, on a free loopback port (never the shared one at 6379),
that a test can kill, stop, continue and restart on the same port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
import redis

from tests.support.procs import free_port, wait_for


class RedisServer:
    """A redis-server of our own, on its own port (never the shared one at 6379).

    ``persist_dir``: keep an append-only file there, fsynced on every write, so a SIGKILL and a
    restart lose nothing Redis acknowledged (a test of the proxy's records must not count what
    a memory-only Redis forgot when it was killed)."""

    def __init__(self, persist_dir: str | None = None) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.persist_dir = persist_dir

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        durability = ["--appendonly", "no"]
        if self.persist_dir is not None:
            durability = ["--appendonly", "yes", "--appendfsync", "always",
                          "--dir", self.persist_dir]  # fmt: skip
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        try:
            wait_for(lambda: _ping(client), timeout_s=10)
        finally:
            client.close()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def _ping(c: redis.Redis) -> bool:
    try:
        return bool(c.ping())
    except redis.RedisError:
        return False
