"""``ShmView``: the ``SharedView`` of the workers of one machine, in shared memory.

``rightsizer serve --workers N`` runs N worker processes behind one port (SO_REUSEPORT). They
share what admission and routing must share without a network round trip: each worker owns
one block of a shared-memory segment and is its only writer; readers sum the other blocks.

Block of worker i (8-byte cells)::

    heartbeat_ns                       monotonic ns of the worker's last sign of life
    backend_inflight[B]                this worker's requests in flight per backend
    tenant_inflight[T], tenant_window, tenant_tokens[T]   configured tenants only (limits)
    ring_cursor, ring[K] x 3 cells     prefix decisions: (backend index | group size), t, hash

Writes are plain aligned 8-byte stores from one process (atomic on the CPUs we run on);
``publish_*`` write through on every change, so a reader sees the others' counts at once
(no sync interval: the slack of a stale view is one store). A worker whose heartbeat is older
than ``STALE_S`` is not counted (it died; the supervisor restarts it, zeroing its block).

Prefix decisions go to the writer's ring; ``sync`` (every ``shared.sync_interval_s``, off the
request path) applies the other workers' new entries to this worker's prefix scorer, so
requests sharing a prefix keep reaching the same backend whichever worker accepted them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import shared_memory
from typing import Any

from estimator.records import RequestRecord

RING = 8192
STALE_S = 5.0
_HEAD = 4  # magic, workers, backends, tenants
_MAGIC = 0x5253484D  # "RSHM"


def layout(backends: int, tenants: int) -> int:
    """Cells per worker block."""
    return 1 + backends + tenants + 1 + tenants + 1 + 3 * RING


def segment_size(workers: int, backends: int, tenants: int) -> int:
    return 8 * (_HEAD + workers * layout(backends, tenants))


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Keep the segment out of this process's resource tracker: before Python 3.13
    (``track=False``) it would unlink a segment it saw when its process exits, even one it
    only attached to, pulling it from under the other workers. Lifetimes are explicit here:
    the supervisor creates the segment and ``destroy``s it."""
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def create(name: str, workers: int, backends: int, tenants: int) -> shared_memory.SharedMemory:
    """The supervisor makes the segment (zeroed) before it starts the workers."""
    shm = shared_memory.SharedMemory(
        name=name, create=True, size=segment_size(workers, backends, tenants)
    )
    _untrack(shm)
    cells = shm.buf.cast("q")
    for i in range(len(cells)):
        cells[i] = 0
    cells[0], cells[1], cells[2], cells[3] = _MAGIC, workers, backends, tenants
    cells.release()
    return shm


def attach(name: str) -> shared_memory.SharedMemory:
    """Open the supervisor's segment without adopting it (see ``_untrack``)."""
    shm = shared_memory.SharedMemory(name=name)
    _untrack(shm)
    return shm


def destroy(shm: shared_memory.SharedMemory) -> None:
    """Close and remove a segment made by ``create``."""
    shm.close()
    with contextlib.suppress(FileNotFoundError):
        import _posixshmem  # type: ignore[import-not-found]

        _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]


def clear_block(shm: shared_memory.SharedMemory, index: int) -> None:
    """Zero a dead worker's block (its requests are gone) before it is restarted."""
    cells = shm.buf.cast("q")
    per = layout(int(cells[2]), int(cells[3]))
    base = _HEAD + index * per
    for i in range(base, base + per):
        cells[i] = 0
    cells.release()


class ShmView:
    """This worker's view of the other workers on the machine (see the module docstring)."""

    def __init__(
        self,
        name: str,
        index: int,
        backends: Sequence[str],
        tenants: Sequence[str],
        *,
        learn_prefix: Callable[[str, Sequence[bytes], float], None] | None = None,
        sync_interval_s: float = 0.05,
    ) -> None:
        self._shm = attach(name)
        cells = self._shm.buf.cast("q")
        if cells[0] != _MAGIC or cells[2] != len(backends) or cells[3] != len(tenants):
            cells.release()
            self._shm.close()
            raise ValueError(f"shared memory {name!r} does not match this configuration")
        self._cells = cells
        self.workers, self.index = int(cells[1]), index
        self._b = {n: i for i, n in enumerate(backends)}
        self._names = list(backends)
        self._t = {n: i for i, n in enumerate(tenants)}
        self._per = layout(len(backends), len(tenants))
        self._nb, self._nt = len(backends), len(tenants)
        self._learn, self._interval = learn_prefix, sync_interval_s
        self._read = [0] * self.workers  # ring entries applied, per writer
        self._task: asyncio.Task[None] | None = None
        self._beat()

    # --- cell addressing ---

    def _base(self, worker: int) -> int:
        return _HEAD + worker * self._per

    def _beat(self) -> None:
        self._cells[self._base(self.index)] = time.monotonic_ns()

    def _others(self) -> list[int]:
        now, stale = time.monotonic_ns(), int(STALE_S * 1e9)
        cells = self._cells
        return [w for w in range(self.workers)
                if w != self.index and now - cells[self._base(w)] < stale]  # fmt: skip

    # --- SharedView ---

    @property
    def replicas(self) -> int:
        return 1 + len(self._others())

    up = True
    fresh = True  # write-through: the others' counts are current

    def remote_inflight(self, backend: str) -> int:
        b = self._b.get(backend)
        if b is None:
            return 0
        cells = self._cells
        return sum(cells[self._base(w) + 1 + b] for w in self._others())

    def remote_tenant_inflight(self, tenant: str) -> int:
        t = self._t.get(tenant)
        if t is None:
            return 0
        cells, off = self._cells, 1 + self._nb + t
        return sum(cells[self._base(w) + off] for w in self._others())

    def remote_tenant_tokens(self, tenant: str) -> int:
        t = self._t.get(tenant)
        if t is None:
            return 0
        cells, window = self._cells, int(time.time() // 60)
        off_w = 1 + self._nb + self._nt
        total = 0
        for w in self._others():
            base = self._base(w)
            if cells[base + off_w] == window:
                total += cells[base + off_w + 1 + t]
        return total

    def remote_by_backend(self) -> Mapping[str, int]:
        return {n: self.remote_inflight(n) for n in self._names}

    def publish_backend(self, backend: str, inflight: int) -> None:
        b = self._b.get(backend)
        if b is not None:
            self._cells[self._base(self.index) + 1 + b] = inflight

    def publish_tenant(self, tenant: str, inflight: int, tokens: int, window: int) -> None:
        t = self._t.get(tenant)
        if t is None:
            return
        base, cells = self._base(self.index), self._cells
        cells[base + 1 + self._nb + t] = inflight
        off_w = base + 1 + self._nb + self._nt
        if cells[off_w] != window:  # a new minute: the other tenants' counts start over
            for i in range(self._nt):
                cells[off_w + 1 + i] = 0
            cells[off_w] = window
        cells[off_w + 1 + t] = tokens

    def on_record(self, rec: RequestRecord) -> None:
        pass  # records reach the one estimator of the machine through its socket

    def on_routed(self, backend: str, hashes: Sequence[bytes]) -> None:
        b = self._b.get(backend)
        if b is None or not hashes:
            return
        cells = self._cells
        base = self._base(self.index)
        ring = base + 1 + self._nb + 2 * self._nt + 1
        cursor = cells[ring]
        now = struct.unpack("q", struct.pack("d", time.monotonic()))[0]
        n = len(hashes)
        for k, h in enumerate(hashes):
            slot = ring + 1 + 3 * ((cursor + k) % RING)
            cells[slot] = (b << 16) | (n if k == 0 else 0)
            cells[slot + 1] = now
            cells[slot + 2] = int.from_bytes(h, "little", signed=True)
        cells[ring] = cursor + n  # published after the entries

    # --- lifetime ---

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.close()

    def close(self) -> None:
        """Leave: nothing in flight here any more, not alive; detach."""
        base = self._base(self.index)
        for i in range(base, base + 1 + self._nb + 2 * self._nt + 1):
            self._cells[i] = 0
        self._cells.release()
        self._shm.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._beat()
            self.sync()

    def sync(self) -> None:
        """Apply the other workers' new prefix decisions."""
        if self._learn is None:
            return
        cells = self._cells
        for w in range(self.workers):
            if w == self.index:
                continue
            ring = self._base(w) + 1 + self._nb + 2 * self._nt + 1
            cursor = int(cells[ring])
            start = max(self._read[w], cursor - RING)
            self._apply(cells, ring, start, cursor)
            self._read[w] = cursor

    def _apply(self, cells: Any, ring: int, start: int, end: int) -> None:
        i = start
        while i < end:
            slot = ring + 1 + 3 * (i % RING)
            head = int(cells[slot])
            n, b = head & 0xFFFF, head >> 16
            if n == 0 or i + n > end or b >= len(self._names):
                i += 1  # the middle of a group whose head was overwritten: skip
                continue
            t = struct.unpack("d", struct.pack("q", cells[slot + 1]))[0]
            hashes = [
                int(cells[ring + 1 + 3 * ((i + k) % RING) + 2]).to_bytes(8, "little", signed=True)
                for k in range(n)
            ]
            assert self._learn is not None
            self._learn(self._names[b], hashes, t)
            i += n
