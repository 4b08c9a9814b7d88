"""Start real rightsizer processes (proxy, emulated engines) on ephemeral loopback ports and
stop them by pid. Readiness is polled over HTTP; no fixed sleeps."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class Proc:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if http_get(self.url + path, timeout=1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def metrics_text(self) -> str:
        return http_get(self.url + "/metrics")[1].decode()


def _spawn(name: str, args: Sequence[str], port: int, env: dict[str, str] | None = None) -> Proc:
    log_path = Path(tempfile.mkstemp(prefix=f"rightsizer-{name}-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    return Proc(name, f"http://127.0.0.1:{port}", proc, log_path)


def start_emulator(
    model: str = "emu", *, ttft: float = 0.02, itl: float = 0.005, max_num_seqs: int = 64,
    port: int | None = None, extra: Sequence[str] = (),
) -> Proc:  # fmt: skip
    port = port or free_port()
    args = ["emulate", "--port", str(port), "--served-model-name", model, "--ttft", str(ttft),
            "--itl", str(itl), "--max-num-seqs", str(max_num_seqs), *extra]  # fmt: skip
    p = _spawn(f"emulator-{port}", args, port)
    p.wait_ready("/health")
    return p


def start_proxy(
    backends: Sequence[str], *, config: dict[str, object] | None = None,
    request_log: Path | None = None, extra: Sequence[str] = (), env: dict[str, str] | None = None,
    wait: str = "/ready", workers: int = 1,
) -> Proc:  # fmt: skip
    """``workers``: 1 (one process, the default here) or more (``serve --workers N``)."""
    port = free_port()
    env = {"RIGHTSIZER_SERVER__WORKERS": str(workers), **(env or {})}
    args = ["serve", "--port", str(port), *extra]
    for b in backends:
        args += ["--backend", b]
    if request_log is not None:
        args += ["--request-log", str(request_log)]
    if config is not None:
        cfg_path = Path(tempfile.mkstemp(prefix="rightsizer-cfg-", suffix=".yaml")[1])
        cfg_path.write_bytes(orjson.dumps(config))  # JSON is YAML
        args += ["--config", str(cfg_path)]
    p = _spawn(f"proxy-{port}", args, port, env)
    p.wait_ready(wait)
    if workers > 1:  # every worker listening, not only the first to answer
        seen: set[object] = set()

        def all_up() -> bool:
            status, body = http_get(p.url + "/ready", timeout=1.0)
            if status == 200:
                seen.add(orjson.loads(body).get("worker"))
            return len(seen) >= workers

        wait_for(all_up, timeout_s=30, interval_s=0.02)
    return p


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def read_records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: object, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval_s)
    raise TimeoutError("condition not met in time")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of samples named ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def start_estimator(redis_url: str, *, config: dict[str, object] | None = None,
                    from_start: bool = True) -> Proc:  # fmt: skip
    port = free_port()
    args = ["estimator", "--redis-url", redis_url, "--port", str(port)]
    if from_start:
        args.append("--from-start")
    if config is not None:
        cfg_path = Path(tempfile.mkstemp(prefix="rightsizer-cfg-", suffix=".yaml")[1])
        cfg_path.write_bytes(orjson.dumps(config))
        args += ["--config", str(cfg_path)]
    p = _spawn(f"estimator-{port}", args, port)
    p.wait_ready("/health")
    return p


def start_fault_proxy(upstream: str) -> Proc:
    """``tests/support/fault_proxy.py`` in front of ``upstream`` (ready when it forwards
    ``/health``); ``set_fault(proc, mode=..., status=...)`` switches it."""
    port = free_port()
    script = Path(__file__).resolve().parent / "fault_proxy.py"
    log_path = Path(tempfile.mkstemp(prefix="rightsizer-fault-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(port), "--upstream", upstream],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    p = Proc(f"fault-{port}", f"http://127.0.0.1:{port}", proc, log_path)
    p.wait_ready("/health")
    return p


def set_fault(p: Proc, **state: object) -> None:
    req = urllib.request.Request(p.url + "/_fault", data=orjson.dumps(state), method="POST",
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()
