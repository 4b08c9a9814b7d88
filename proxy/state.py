"""State shared across proxy replicas, so several replicas route and shed like one.

``SharedView`` is what admission, routing and the tenant ledger read of the other replicas:
their in-flight requests per backend and per tenant, their tenant token usage this minute,
and how many replicas there are. Two implementations: ``LocalView`` (one replica: all zeros)
and ``RedisView``.

``RedisView``: nothing is on the request path. Requests read and update local state (the
backends' in-flight counts, the prefix scorer's indexes, the tenant ledger); one background
task syncs it every ``sync_interval_s`` with two pipelined round trips:

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
of it. Records produced meanwhile wait in a bounded outbox (``OUTBOX_MAX``) and are sent once
Redis is back; only records pushed out of a full outbox are lost, each one counted in
``rightsizer_records_dropped_total{sink="redis_stream"}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from estimator.records import RequestRecord

from .config import SharedStateConfig

log = logging.getLogger("rightsizer.shared")
OUTBOX_MAX = 50_000
RECORDS_PER_ENTRY = 200


class SharedView(Protocol):
    """What this replica knows of the others (read on the request path: cheap, never I/O)."""

    @property
    def replicas(self) -> int:
        """Live replicas sharing the backends, this one included."""
        ...

    @property
    def up(self) -> bool: ...

    @property
    def fresh(self) -> bool:
        """The other replicas' counts are current (not a periodically synced copy)."""
        ...

    def remote_inflight(self, backend: str) -> int: ...
    def remote_tenant_inflight(self, tenant: str) -> int: ...
    def remote_tenant_tokens(self, tenant: str) -> int:
        """The other replicas' tokens for ``tenant`` in the current wall-clock minute."""
        ...

    def remote_by_backend(self) -> Mapping[str, int]: ...
    def publish_backend(self, backend: str, inflight: int) -> None:
        """This replica's in-flight count on ``backend`` changed (write-through views)."""
        ...

    def publish_tenant(self, tenant: str, inflight: int, tokens: int, window: int) -> None:
        """This replica's counts for ``tenant`` changed (``window``: the wall-clock minute)."""
        ...

    def on_record(self, rec: RequestRecord) -> None: ...
    def on_routed(self, backend: str, hashes: Sequence[bytes]) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class LocalView:
    """One replica alone: nobody else holds anything."""

    replicas = 1
    up = True
    fresh = True

    def remote_inflight(self, backend: str) -> int:
        return 0

    def remote_tenant_inflight(self, tenant: str) -> int:
        return 0

    def remote_tenant_tokens(self, tenant: str) -> int:
        return 0

    def remote_by_backend(self) -> Mapping[str, int]:
        return {}

    def publish_backend(self, backend: str, inflight: int) -> None:
        pass

    def publish_tenant(self, tenant: str, inflight: int, tokens: int, window: int) -> None:
        pass

    def on_record(self, rec: RequestRecord) -> None:
        pass

    def on_routed(self, backend: str, hashes: Sequence[bytes]) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def unpack_hashes(packed: bytes) -> Iterator[list[bytes]]:
    """The routing decisions packed by ``on_routed``: each [count, 2 bytes][count x 8 bytes]."""
    i = 0
    while i + 2 <= len(packed):
        n = int.from_bytes(packed[i : i + 2], "big")
        body = packed[i + 2 : i + 2 + 8 * n]
        i += 2 + 8 * n
        yield [body[k : k + 8] for k in range(0, len(body), 8)]


class LocalState(Protocol):
    """This replica's own counts, which ``RedisView`` publishes (read-only)."""

    def backend_inflight(self) -> Mapping[str, int]: ...
    def tenant_inflight(self) -> Mapping[str, int]: ...
    def tenant_tokens(self) -> Mapping[str, int]:
        """Tokens per tenant in the current wall-clock minute."""
        ...


class RedisView:
    """The Redis-backed view of one proxy replica (see the module docstring)."""

    def __init__(
        self,
        cfg: SharedStateConfig,
        local: LocalState,
        *,
        learn_prefix: Callable[[str, Sequence[bytes], float], None] | None = None,
        prefix_ttl_s: float = 600.0,
        on_change: Callable[[], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        replica_id: str | None = None,
    ) -> None:
        assert cfg.redis_url is not None
        self.cfg, self.local = cfg, local
        self.learn_prefix, self.prefix_ttl_s = learn_prefix, prefix_ttl_s
        self.on_change, self.on_dropped = on_change, on_dropped
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
        self.fresh = False  # synced every sync_interval_s
        self.syncs = {"ok": 0, "failed": 0}  # completed sync rounds, for telemetry
        self.replicas = 1
        self._ever_up = False
        self._remote: dict[str, int] = {}
        self._remote_tenants: dict[str, int] = {}
        self._remote_tokens: dict[str, int] = {}
        self._prefix_out: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=OUTBOX_MAX
        )
        self._records_out: collections.deque[RequestRecord] = collections.deque()
        self._tpm_pushed: collections.Counter[str] = collections.Counter()
        self._tpm_window = -1
        self._records_maxlen = max(100, cfg.records_stream_maxlen // RECORDS_PER_ENTRY)
        self._state_fields: set[str] = set()
        self._prefix_last_id = "0-0"  # a new replica warms its indexes from the stream
        self._task: asyncio.Task[None] | None = None

    # --- reads (request path) ---

    def remote_inflight(self, backend: str) -> int:
        return self._remote.get(backend, 0)

    def remote_tenant_inflight(self, tenant: str) -> int:
        return self._remote_tenants.get(tenant, 0)

    def remote_tenant_tokens(self, tenant: str) -> int:
        return self._remote_tokens.get(tenant, 0)

    def remote_by_backend(self) -> Mapping[str, int]:
        return self._remote

    def publish_backend(self, backend: str, inflight: int) -> None:
        pass  # read from the local state at each sync

    def publish_tenant(self, tenant: str, inflight: int, tokens: int, window: int) -> None:
        pass

    # --- hooks called on the request path (local, O(1)) ---

    def on_routed(self, backend: str, hashes: Sequence[bytes]) -> None:
        if hashes:  # one routing decision: [block count, 2 bytes][its 8-byte hashes]
            self._prefix_out.append((backend, len(hashes).to_bytes(2, "big") + b"".join(hashes)))

    def on_record(self, rec: RequestRecord) -> None:
        """Queue a record for the stream (serialised in batches by the sync, off the request
        path); a full outbox drops its oldest record, counted."""
        out = self._records_out
        if len(out) >= OUTBOX_MAX:
            out.popleft()
            if self.on_dropped is not None:
                self.on_dropped(1)
        out.append(rec)

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
            await asyncio.wait_for(self.sync_once(), self.cfg.op_timeout_s * 4)  # last records
            await asyncio.wait_for(self._retire(), self.cfg.op_timeout_s * 2)
        if self._records_out and self.on_dropped is not None:
            self.on_dropped(len(self._records_out))
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
            self.syncs["failed"] += 1
            self._down(exc)
            return False
        self.syncs["ok"] += 1
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
        self.replicas = 1
        self._remote, self._remote_tenants, self._remote_tokens = {}, {}, {}
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
        state: dict[str, int | str] = {
            f"b:{b}": n for b, n in self.local.backend_inflight().items()
        }
        state.update({f"t:{t}": n for t, n in self.local.tenant_inflight().items()})
        deltas = {
            t: n - self._tpm_pushed[t]
            for t, n in self.local.tenant_tokens().items()
            if n != self._tpm_pushed[t]
        }
        prefix: dict[str, list[bytes]] = collections.defaultdict(list)
        for _ in range(len(self._prefix_out)):  # hints: lost, not resent, if this sync fails
            backend, packed = self._prefix_out.popleft()
            prefix[backend].append(packed)
        sending = min(len(self._records_out), 50 * RECORDS_PER_ENTRY)
        records = [self._records_out[i] for i in range(sending)]
        gone = self._state_fields - state.keys()  # e.g. a tenant with nothing in flight now
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
        # sent: only now leave the outbox (a failed pipeline keeps them for the next sync)
        for _ in range(min(sending, len(self._records_out))):
            self._records_out.popleft()
        self._state_fields = set(state)
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
        self.replicas = 1 + len(others) - len(dead)
        self._remote = {k[2:]: v for k, v in remote.items() if k.startswith("b:")}
        self._remote_tenants = {k[2:]: v for k, v in remote.items() if k.startswith("t:")}
        self._remote_tokens = {
            k.decode(): int(v) - self._tpm_pushed.get(k.decode(), 0) for k, v in tpm.items()
        }
        self._apply_prefix(res[-1])
        if self.on_change is not None:
            self.on_change()  # others' slots may have freed: admit what now fits
        if dead:
            await self.redis.srem(self.k_replicas, *dead)

    def _apply_prefix(self, streams: Any) -> None:
        now, wall_ms = time.monotonic(), time.time() * 1000
        for _stream, entries in streams or ():
            for entry_id, fields in entries:
                self._prefix_last_id = entry_id.decode()
                age_s = (wall_ms - int(self._prefix_last_id.split("-")[0])) / 1000
                mine = fields.get(b"r", b"").decode() == self.replica
                if mine or age_s > self.prefix_ttl_s or self.learn_prefix is None:
                    continue
                backend = fields.get(b"b", b"").decode()
                for hashes in unpack_hashes(fields.get(b"h", b"")):
                    self.learn_prefix(backend, hashes, now - max(0.0, age_s))
