"""Shadow traffic: copies of admitted baseline requests, sent to the candidate group and thrown
away, so a candidate is measured on production traffic with no user exposed to it.

Off the client's path entirely: ``offer`` (on the request path, after admission) is a hash and
a ``put_nowait`` on a bounded queue per experiment (``shadow.queue``; full: the copy is
dropped and counted). ``shadow.concurrency`` background workers per experiment send the
copies. Shadow traffic sheds first: a copy is dropped, never queued in admission, when it has
waited over ``shadow.max_delay_s``, when no candidate backend has headroom under its
admission limit, or when a real request waits for the candidate group. A copy holds a slot on
the candidate backend while in flight (it loads the engine), but counts against no tenant.

Copies are always streamed with usage (the client's own request may not be), so each one
measures TTFT, inter-token gaps and exact token counts. Each ends in one ``RequestRecord``
with ``shadow=True`` and the candidate's group, the client request's id, tenant and priority:
to the request log, the estimator and the experiment's rollback window, never to the
client-facing request metrics (``rightsizer_group_*`` has its own ``traffic="shadow"``
series). Results per experiment: ``rightsizer_shadow_requests_total{experiment,result}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from estimator.records import Outcome

from ..admission.limits import Limits
from ..config import ProxyConfig
from ..recorder import Recorder
from ..request import InferenceRequest, Measurement
from ..tasks import cancel_and_wait
from ..upstream.backends import Backend, BackendPool
from ..upstream.relay import apply_usage, drain_stream
from ..upstream.transport import Transport
from .control import Experiment, Experiments

log = logging.getLogger("rightsizer.shadow")


@dataclass(frozen=True, slots=True)
class ShadowJob:
    req: InferenceRequest
    experiment: Experiment
    enqueued: float  # perf_counter


def shadow_body(req: InferenceRequest) -> bytes:
    """The copy's body: the client's, streamed with the usage chunk."""
    body = dict(req.body or {})
    body["stream"] = True
    opts = body.get("stream_options")
    body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return orjson.dumps(body)


class ShadowRunner:
    def __init__(
        self,
        config: ProxyConfig,
        experiments: Experiments,
        *,
        pool: BackendPool,
        limits: Limits,
        transport: Transport,
        recorder: Recorder,
        waiting: Callable[[str, str | None], int],
    ) -> None:
        self.config, self.experiments = config, experiments
        self.pool, self.limits, self.transport, self.recorder = pool, limits, transport, recorder
        self.waiting = waiting
        self.queues: dict[str, asyncio.Queue[ShadowJob]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def depth(self, experiment: str) -> int:
        q = self.queues.get(experiment)
        return 0 if q is None else q.qsize()

    # --- request path ---

    def offer(self, req: InferenceRequest, exp: Experiment, served_group: str | None) -> None:
        """After admission: queue a copy when this request is sampled (O(1), never raises)."""
        if served_group == exp.candidate or req.body is None:
            return  # the candidate serves it already
        if not self.experiments.shadow_wanted(exp, req.request_id):
            return
        q = self.queues.get(exp.name)
        if q is None:
            exp.shadow["dropped_not_running"] += 1
            return
        try:
            q.put_nowait(ShadowJob(req, exp, time.perf_counter()))
        except asyncio.QueueFull:
            exp.shadow["dropped_queue_full"] += 1

    # --- background ---

    async def start(self) -> None:
        for exp in self.experiments.experiments:
            cfg = exp.config.shadow
            q: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=max(1, cfg.queue))
            self.queues[exp.name] = q
            self._tasks += [asyncio.create_task(self._worker(q)) for _ in range(cfg.concurrency)]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    async def _worker(self, q: asyncio.Queue[ShadowJob]) -> None:
        while True:
            job = await q.get()
            try:
                await self._send(job)
            except Exception:  # a shadow copy must never take the worker down; logged
                job.experiment.shadow["error_internal"] += 1
                log.exception("shadow copy of %s failed in the proxy", job.req.request_id)

    def _target(self, job: ShadowJob) -> Backend | str:
        """The candidate backend with the most headroom, or why there is none."""
        exp, req = job.experiment, job.req
        if time.perf_counter() - job.enqueued > exp.config.shadow.max_delay_s:
            return "dropped_stale"
        if self.waiting(req.model, exp.candidate):
            return "dropped_busy"
        group_of = self.experiments.group_of
        room = [
            b
            for b in self.pool.serving(req.model)
            if group_of(b.name) == exp.candidate and self.limits.has_headroom(b)
        ]
        if not room:
            return "dropped_busy"
        return min(room, key=self.limits.load)

    async def _send(self, job: ShadowJob) -> None:
        exp, req = job.experiment, job.req
        target = self._target(job)
        if isinstance(target, str):
            exp.shadow[target] += 1
            return
        backend = target
        meas = Measurement(req.request_id)
        meas.shadow, meas.group = True, exp.candidate
        meas.dispatched(backend.name, (self.limits.total(backend), backend.inflight_tokens))
        backend.acquire(req.est_tokens)
        try:
            await self._exchange(req, backend, meas)
        except asyncio.CancelledError:
            meas.fail(Outcome.SHUTDOWN, 503)
            raise
        finally:
            backend.release(req.est_tokens)
            meas.end_s = time.perf_counter()
            exp.shadow["ok" if meas.outcome is Outcome.OK else "error"] += 1
            self.recorder.submit_shadow(meas, req)

    async def _exchange(self, req: InferenceRequest, backend: Backend, meas: Measurement) -> None:
        cfg = self.config
        total = cfg.timeouts.total_s
        try:
            async with asyncio.timeout(total):
                resp = await self.transport.send(
                    backend, "POST", req.path, shadow_body(req), req.headers, req.client_auth
                )
                if resp.status == 200 and resp.content_type == "text/event-stream":
                    await drain_stream(
                        meas,
                        resp,
                        est_prompt_tokens=req.est_prompt_tokens,
                        max_event_bytes=cfg.relay.max_event_bytes,
                    )
                else:
                    await self._plain(resp, meas)
        except TimeoutError:
            meas.fail(Outcome.TIMEOUT, 504)
        except aiohttp.ClientError:
            meas.fail(Outcome.UPSTREAM_ERROR, 502)
        if meas.outcome in (Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT):
            self.pool.report_failure(backend, f"shadow_{meas.outcome.value}")
        elif meas.outcome is Outcome.OK:
            self.pool.report_success(backend)

    @staticmethod
    async def _plain(resp: aiohttp.ClientResponse, meas: Measurement) -> None:
        try:
            body = await resp.read()
        finally:
            resp.release()
        meas.status = resp.status
        if resp.status >= 400:
            meas.outcome = Outcome.CLIENT_ERROR if resp.status < 500 else Outcome.UPSTREAM_ERROR
            return
        with contextlib.suppress(orjson.JSONDecodeError):
            obj = orjson.loads(body)
            if isinstance(obj, dict):
                apply_usage(meas, obj.get("usage"))
