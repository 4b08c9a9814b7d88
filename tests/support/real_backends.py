"""Start and stop real inference servers (vLLM CPU, llama.cpp llama-server) for tests.

Everything comes from the cache that ``.ci/install_backends.sh`` fills
(``$RIGHTSIZER_CI_CACHE``, default ``~/.cache/rightsizer-ci``): the vLLM venv, the
``llama-server`` binary and the tiny models. Each server runs in its own process group on
an ephemeral loopback port, logs to a file in a fresh temp folder, and is ready when
``/health`` answers 200 and ``/v1/models`` lists its served name::

    with start_llama_server() as server:
        ...  # server.url, server.model

This module has no pytest fixtures (see ``conftest.py``) so other tests and scripts can
import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

CACHE = Path(os.environ.get("RIGHTSIZER_CI_CACHE") or Path.home() / ".cache" / "rightsizer-ci")
VLLM_PYTHON = CACHE / "venv-vllm" / "bin" / "python"
LLAMA_SERVER = CACHE / "bin" / "llama-server"
MODELS = CACHE / "models"

_INSTALL_HINT = "run .ci/install_backends.sh"
_POLL_S = 0.1


class BackendStartError(RuntimeError):
    """A server exited or did not become ready in time; the message ends with its log."""


@dataclass
class RunningServer:
    kind: Literal["vllm", "llamacpp"]
    url: str
    model: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``timeout_s``."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Children (vLLM's engine core) may outlive the leader: clear the group.
        _signal_group(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (to test backend failure)."""
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_mib(self) -> float:
        """Resident memory of every live process in the server's group, in MiB."""
        return _group_rss_bytes(self.proc.pid) / 2**20


def free_port() -> int:
    """An unused loopback port (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_available(model: str = "tiny") -> str | None:
    """None when vLLM can be started with ``model``, else why not."""
    if not VLLM_PYTHON.exists():
        return f"no vLLM venv at {VLLM_PYTHON.parent.parent}: {_INSTALL_HINT}"
    if not any(VLLM_PYTHON.parent.parent.glob(".rightsizer-vllm-*")):
        return f"vLLM venv at {VLLM_PYTHON.parent.parent} is incomplete: {_INSTALL_HINT}"
    if not (MODELS / model / "config.json").is_file():
        return f"no model {MODELS / model}: {_INSTALL_HINT}"
    return None


def llama_available() -> str | None:
    """None when llama-server can be started with the tiny GGUF, else why not."""
    if not os.access(LLAMA_SERVER, os.X_OK):
        return f"no llama-server binary at {LLAMA_SERVER}: {_INSTALL_HINT}"
    if not (MODELS / "tiny.gguf").is_file():
        return f"no model {MODELS / 'tiny.gguf'}: {_INSTALL_HINT}"
    return None


def start_vllm(
    model: str = "tiny",
    served_name: str = "tiny-vllm",
    *,
    max_num_seqs: int | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 240,
    env: dict[str, str] | None = None,
) -> RunningServer:
    """vLLM's OpenAI server on ``MODELS/model``, eager mode, prefix caching on; ``env`` adds
    to its environment (e.g. ``VLLM_CPU_OMP_THREADS_BIND`` to give two servers a core each)."""
    if reason := vllm_available(model):
        raise BackendStartError(reason)

    def command(p: int) -> list[str]:
        cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(MODELS / model), "--served-model-name", served_name,
               "--host", "127.0.0.1", "--port", str(p), "--max-model-len", "2048",
               "--dtype", "bfloat16", "--enforce-eager", "--enable-prefix-caching"]  # fmt: skip
        if max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(max_num_seqs)]
        return [*cmd, *extra_args]

    env_all = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **(env or {}),
    }
    return _start("vllm", served_name, command, env_all, port, timeout_s)


def require(reason: str | None, what: str = "") -> None:
    """For tests: nothing when ``reason`` is None; else skip, or fail under ``CI=true`` (CI
    installs every real backend, so there a missing one is a defect, never a skip)."""
    if reason is None:
        return
    import pytest  # here: the benchmarks import this module without pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true{' and ' + what if what else ''}: {reason}")
    pytest.skip(reason)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _tasks(pid: int) -> list[int]:
    """The thread ids of ``pid`` (empty once it has gone)."""
    return [int(t.name) for t in Path(f"/proc/{pid}/task").glob("[0-9]*")]


def _set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (``sched_setaffinity`` takes one thread)."""
    for tid in _tasks(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def isolated_vllm_engine(
    server: RunningServer, front_pids: Sequence[int]
) -> Iterator[dict[str, list[int]]]:
    """Give the vLLM CPU engine a core of its own, as an engine has its GPU to itself, while
    the ``with`` block runs.

    vLLM's CPU worker binds itself to one core; its engine-core process (which alternates
    with the worker, step by step) joins it there. The API server, the other ``front_pids``
    (the proxy, the client) and their threads go to the remaining cores, so per-token HTTP
    work never preempts a step. Yields the two core sets; empty when not possible (fewer
    than two cores, or no pinned worker found). On exit every thread of ``front_pids`` gets
    its CPU set back: the caller (a benchmark, the pytest process) must not stay confined,
    nor start its next server confined, to the front cores."""
    allowed = os.sched_getaffinity(0)
    before = {pid: _affinities(pid) for pid in front_pids}
    tree = _descendants(server.pid)
    engine: set[int] = set()
    for pid in tree:
        with contextlib.suppress(OSError):
            if "Worker" in Path(f"/proc/{pid}/comm").read_text():
                cpus = os.sched_getaffinity(pid)
                if cpus != allowed:
                    engine |= cpus
    front = allowed - engine
    if not engine or not front:
        yield {"engine_cpus": [], "front_cpus": []}
        return
    for pid in tree:
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text()
            if "Worker" not in comm:
                _set_affinity(pid, engine if "EngineCor" in comm else front)  # comm: 15 chars
    for pid in front_pids:
        _set_affinity(pid, front)
    try:
        yield {"engine_cpus": sorted(engine), "front_cpus": sorted(front)}
    finally:
        for pid in front_pids:
            for tid in _tasks(pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, before[pid].get(tid, allowed))


def pin(pid: int, cpus: set[int], *, idle: bool = False) -> None:
    """Every thread of ``pid`` and of its descendants onto ``cpus``; ``idle``: in the idle
    scheduling class too (it runs only when nothing else wants the CPU)."""
    for p in _descendants(pid):
        _set_affinity(p, cpus)
        if idle:
            for tid in _tasks(p):
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


@contextlib.contextmanager
def confined(pids: Sequence[int], cpus: set[int]) -> Iterator[None]:
    """Every thread of ``pids`` and of their descendants on ``cpus`` while the ``with`` block
    runs; each thread gets its CPU set back on exit (the caller's own process included)."""
    allowed = os.sched_getaffinity(0)
    tree = [p for pid in pids for p in _descendants(pid)]
    before = {p: _affinities(p) for p in tree}
    for p in tree:
        _set_affinity(p, cpus)
    try:
        yield
    finally:
        for p in tree:
            for tid in _tasks(p):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, before[p].get(tid, allowed))


def _affinities(pid: int) -> dict[int, set[int]]:
    """Each thread's CPU set."""
    out = {}
    for tid in _tasks(pid):
        with contextlib.suppress(OSError):
            out[tid] = os.sched_getaffinity(tid)
    return out


def start_llama_server(
    served_name: str = "tiny-llama",
    *,
    slots: int = 4,
    ctx: int = 8192,
    port: int | None = None,
    timeout_s: float = 60,
    threads: int = 2,
) -> RunningServer:
    """llama-server on the tiny GGUF; ``ctx`` is the total context shared by the slots."""
    if reason := llama_available():
        raise BackendStartError(reason)

    def command(p: int) -> list[str]:
        return [str(LLAMA_SERVER), "-m", str(MODELS / "tiny.gguf"), "--alias", served_name,
                "--host", "127.0.0.1", "--port", str(p), "-c", str(ctx), "-np", str(slots),
                "-cb", "--metrics", "--jinja", "-t", str(threads)]  # fmt: skip

    return _start("llamacpp", served_name, command, {}, port, timeout_s)


def _start(
    kind: Literal["vllm", "llamacpp"],
    served_name: str,
    command: Callable[[int], list[str]],
    env: dict[str, str],
    port: int | None,
    timeout_s: float,
) -> RunningServer:
    # With a port of our own choosing, retry once if another process took it first.
    attempts = 1 if port is not None else 2
    for attempt in range(attempts):
        server = _spawn(kind, served_name, command(port or free_port()), env)
        try:
            _wait_ready(server, timeout_s)
        except BackendStartError:
            server.stop()
            if attempt + 1 < attempts and "address already in use" in server.log_tail().lower():
                continue
            raise
        return server
    raise AssertionError("unreachable")


def _spawn(
    kind: Literal["vllm", "llamacpp"], served_name: str, cmd: list[str], env: dict[str, str]
) -> RunningServer:
    port = cmd[cmd.index("--port") + 1]
    log_path = Path(tempfile.mkdtemp(prefix=f"rightsizer-{kind}-")) / "server.log"
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    return RunningServer(kind, f"http://127.0.0.1:{port}", served_name, proc, log_path)


def _wait_ready(server: RunningServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (code := server.proc.poll()) is not None:
            raise BackendStartError(
                f"{server.kind} exited with {code} while starting; log {server.log_path}:\n"
                + server.log_tail()
            )
        if _get_status(server.url + "/health") == 200 and server.model in _served_models(server):
            return
        time.sleep(_POLL_S)
    raise BackendStartError(
        f"{server.kind} not ready after {timeout_s:.0f} s; log {server.log_path}:\n"
        + server.log_tail()
    )


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):  # refused, reset, timeout, not HTTP yet
        return None


def _served_models(server: RunningServer) -> set[str]:
    try:
        with urllib.request.urlopen(server.url + "/v1/models", timeout=2) as response:
            body = json.load(response)
    except (OSError, ValueError):
        return set()
    return {entry.get("id") for entry in body.get("data", [])}


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_rss_bytes(pgid: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised name: state ppid pgrp ... rss is field 24.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += int(fields[21]) * page
    return total
