"""State shared across proxy replicas through Redis, so several replicas route and shed like one.

Nothing here is on the request path: requests read and update the local view (``Backend``
in-flight counts, the router's prefix indexes, the tenant ledger); one background task syncs
that view every ``sync_interval_s`` with two pipelined round trips:

1. push: this replica's in-flight counts per backend and per tenant (a hash that expires when
   the replica stops refreshing it, so a dead replica's counts vanish), its tenant token usage
   for the current minute (``HINCRBY`` of the delta), the prefix blocks it routed since the last
   sync (one stream entry per backend) and the RequestRecords it produced (a JSON array of up to
   200 records per stream entry; both streams are capped); then read the replica set
   and the minute's token totals;
2. pull: the other live replicas' counts and the prefix entries they appended.

Keys (``{p}`` = ``shared.key_prefix``): ``{p}:replicas`` (set), ``{p}:state:{replica}`` (hash,
expiring), ``{p}:tpm:{minute}`` (hash, expiring), ``{p}:prefix`` and ``{p}:records``
(streams, approximately capped).

If Redis is down or slow, every replica keeps serving on its local view (remote counts drop
to zero, ``rightsizer_shared_state_up`` is 0, one warning is logged), keeps retrying, and
pushes its full state again when Redis returns. No request waits on Redis or fails because
of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from estimator.records import RequestRecord

from .backends import BackendPool
from .config import SharedStateConfig
from .routing import Router
from .telemetry import GaugeRow, Metrics
from .tenants import TenantLedger

log = logging.getLogger("rightsizer.shared")
OUTBOX_MAX = 50_000
RECORDS_PER_ENTRY = 200


def unpack_hashes(packed: bytes) -> Iterator[list[bytes]]:
    """The routing decisions packed by ``on_routed``: each [count, 2 bytes][count x 8 bytes]."""
    i = 0
    while i + 2 <= len(packed):
        n = int.from_bytes(packed[i : i + 2], "big")
        body = packed[i + 2 : i + 2 + 8 * n]
        i += 2 + 8 * n
        yield [body[k : k + 8] for k in range(0, len(body), 8)]


class SharedState:
    """The Redis-backed sync of one proxy replica."""

    def __init__(
        self,
        cfg: SharedStateConfig,
        pool: BackendPool,
        router: Router,
        tenants: TenantLedger,
        metrics: Metrics,
        replica_id: str | None = None,
    ) -> None:
        assert cfg.redis_url is not None
        self.cfg, self.pool, self.router, self.tenants, self.metrics = (
            cfg,
            pool,
            router,
            tenants,
            metrics,
        )
        self.replica = replica_id or f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        p = cfg.key_prefix
        self.k_replicas, self.k_prefix, self.k_records = (
            f"{p}:replicas",
            f"{p}:prefix",
            f"{p}:records",
        )
        self.redis = aioredis.Redis.from_url(
            cfg.redis_url, socket_timeout=cfg.op_timeout_s, socket_connect_timeout=cfg.op_timeout_s
        )
        self.up = False
        self._ever_up = False
        self._prefix_out: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=OUTBOX_MAX
        )
        self._records_out: collections.deque[bytes] = collections.deque(maxlen=OUTBOX_MAX)
        self._tpm_pushed: collections.Counter[str] = collections.Counter()
        self._tpm_window = -1
        self._records_maxlen = max(100, cfg.records_stream_maxlen // RECORDS_PER_ENTRY)
        self._state_fields: set[str] = set()
        self._prefix_last_id = "0-0"  # a new replica warms its indexes from the stream
        self._task: asyncio.Task[None] | None = None
        metrics.add_state(self.gauges)

    # --- hooks called on the request path (local, O(1)) ---

    def on_routed(self, backend: str, hashes: Sequence[bytes]) -> None:
        if hashes:  # one routing decision: [block count, 2 bytes][its 8-byte hashes]
            self._prefix_out.append((backend, len(hashes).to_bytes(2, "big") + b"".join(hashes)))

    def on_record(self, rec: RequestRecord) -> None:
        if len(self._records_out) == OUTBOX_MAX:
            self.metrics.records_dropped.labels("redis_stream").inc()
        self._records_out.append(rec)  # serialised in batches by the sync, off the request path

    # --- lifetime ---

    async def start(self) -> None:
        await self.sync_once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._retire(), self.cfg.op_timeout_s * 2)
        await self.redis.aclose()

    async def _retire(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(self.k_replicas, self.replica)
            pipe.delete(self._k_state(self.replica))
            await pipe.execute()

    async def _loop(self) -> None:
        backoff = self.cfg.sync_interval_s
        while True:
            await asyncio.sleep(backoff)
            ok = await self.sync_once()
            backoff = self.cfg.sync_interval_s if ok else min(1.0, backoff * 2)

    async def sync_once(self) -> bool:
        try:
            await asyncio.wait_for(self._sync(), timeout=self.cfg.op_timeout_s * 4)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down(exc)
            return False
        if not self.up:
            log.warning(
                "shared state: Redis is %s; state resynced", "back" if self._ever_up else "up"
            )
        self.up = self._ever_up = True
        return True

    def _down(self, exc: BaseException) -> None:
        if self.up or not self._ever_up:
            log.warning(
                "shared state: Redis unavailable (%s); serving on local state", type(exc).__name__
            )
            self._ever_up = True  # log "back" on recovery, and this warning only once per outage
        self.up = False
        self.pool.replicas = 1
        for b in self.pool.backends:
            b.remote_inflight = 0
        self.tenants.remote_inflight = {}
        self.tenants.remote_window_tokens = {}
        self._tpm_pushed.clear()  # push the whole minute again when Redis returns
        self._state_fields.clear()

    # --- one sync ---

    def _k_state(self, replica: str) -> str:
        return f"{self.cfg.key_prefix}:state:{replica}"

    async def _sync(self) -> None:
        window = int(time.time() // 60)
        k_tpm = f"{self.cfg.key_prefix}:tpm:{window}"
        if window != self._tpm_window:
            self._tpm_window, self._tpm_pushed = window, collections.Counter()
        ttl_ms = max(2000, int(self.cfg.sync_interval_s * 20_000))
        state: dict[str, int | str] = {f"b:{b.name}": b.inflight for b in self.pool.backends}
        state.update({f"t:{t}": n for t, n in self.tenants.inflight.items()})
        deltas = {
            t: n - self._tpm_pushed[t]
            for t, n in self.tenants.window_tokens.items()
            if n != self._tpm_pushed[t]
        }
        prefix: dict[str, list[bytes]] = collections.defaultdict(list)
        for _ in range(len(self._prefix_out)):
            backend, packed = self._prefix_out.popleft()
            prefix[backend].append(packed)
        records = [self._records_out.popleft() for _ in range(len(self._records_out))]
        gone = self._state_fields - state.keys()  # e.g. a tenant with nothing in flight now
        self._state_fields = set(state)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(self.k_replicas, self.replica)
            # overwrite in place (never delete-then-set: a reader in between would see this
            # replica as gone and over-admit)
            pipe.hset(self._k_state(self.replica), mapping={"alive": 1, **state})  # type: ignore[dict-item]
            if gone:
                pipe.hdel(self._k_state(self.replica), *gone)
            pipe.pexpire(self._k_state(self.replica), ttl_ms)
            for t, d in deltas.items():
                pipe.hincrby(k_tpm, t, d)
            pipe.expire(k_tpm, 180)
            for backend, packs in prefix.items():  # one entry per backend per sync
                fields = {"r": self.replica, "b": backend, "h": b"".join(packs)}
                pipe.xadd(self.k_prefix, fields, maxlen=20_000, approximate=True)  # type: ignore[arg-type]
            for i in range(0, len(records), RECORDS_PER_ENTRY):  # a JSON array per entry
                batch = orjson.dumps(records[i : i + RECORDS_PER_ENTRY])
                pipe.xadd(
                    self.k_records, {"rs": batch}, maxlen=self._records_maxlen, approximate=True
                )
            pipe.smembers(self.k_replicas)
            pipe.hgetall(k_tpm)
            res = await pipe.execute()
        for t, d in deltas.items():
            self._tpm_pushed[t] += d
        others = sorted(m.decode() for m in res[-2] if m.decode() != self.replica)
        await self._pull(others, res[-1])

    async def _pull(self, others: list[str], tpm: dict[bytes, bytes]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in others:
                pipe.hgetall(self._k_state(r))
            pipe.xread({self.k_prefix: self._prefix_last_id}, count=20_000)
            res = await pipe.execute()
        remote: collections.Counter[str] = collections.Counter()
        dead = []
        for r, h in zip(others, res[:-1], strict=True):
            if not h:
                dead.append(r)
            for k, v in h.items():
                if k != b"alive":
                    remote[k.decode()] += int(v)
        self.pool.replicas = 1 + len(others) - len(dead)
        for b in self.pool.backends:
            b.remote_inflight = remote.get(f"b:{b.name}", 0)
        self.tenants.remote_inflight = {k[2:]: v for k, v in remote.items() if k.startswith("t:")}
        self.tenants.remote_window_tokens = {
            k.decode(): int(v) - self._tpm_pushed.get(k.decode(), 0) for k, v in tpm.items()
        }
        self._apply_prefix(res[-1])
        if self.pool.on_change is not None:
            self.pool.on_change()  # others' slots may have freed: admit what now fits
        if dead:
            await self.redis.srem(self.k_replicas, *dead)

    def _apply_prefix(self, streams: Any) -> None:
        now, wall_ms = time.monotonic(), time.time() * 1000
        by_name = {b.name: b for b in self.pool.backends}
        for _stream, entries in streams or ():
            for entry_id, fields in entries:
                self._prefix_last_id = entry_id.decode()
                age_s = (wall_ms - int(self._prefix_last_id.split("-")[0])) / 1000
                if (
                    fields.get(b"r", b"").decode() == self.replica
                    or age_s > self.router.prefix_ttl_s
                ):
                    continue
                backend = by_name.get(fields.get(b"b", b"").decode())
                if backend is not None:
                    index = self.router.index(backend)
                    for hashes in unpack_hashes(fields.get(b"h", b"")):
                        index.insert(hashes, now - max(0.0, age_s))

    def gauges(self) -> Iterable[GaugeRow]:
        yield GaugeRow(
            "rightsizer_shared_state_up",
            "1 when the Redis shared state is reachable (0: serving on local state).",
            (),
            [((), 1.0 if self.up else 0.0)],
        )
        yield GaugeRow(
            "rightsizer_shared_state_remote_inflight",
            "Requests other proxy replicas have in flight on each backend.",
            ("backend",),
            [((b.name,), float(b.remote_inflight)) for b in self.pool.backends],
        )
