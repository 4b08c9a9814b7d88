"""The estimator against the real vLLM CPU server (issue 4, "Proof"), shortened.

The procedure of ``bench/estimator_accuracy.py`` (read its docstring) with short steps
(``Settings.test``): vLLM CPU with the 84M model and ``--max-num-seqs 8`` behind the proxy; a
low-rate phase whose request-log records are replayed into an ``Estimator``; its predicted
capacity at the SLO; then a measured open-loop ramp at 0.5, 0.8, 1.0 and 1.25 times that
capacity (50-60 requests per step), and up to three more steps above that when none missed
the SLO. 5-12 minutes per run, depending on the machine's speed.

What is asserted, and why it is not the issue's 15% / 20% (the full benchmark reports those).
A p95 of a 50-60-request step is its third-largest value, and near capacity one burst of
arrivals decides it. Runs of this procedure have measured an SLO ratio of 1.84 at 0.8 C and
0.74 at 0.95 C in one ramp, and a capacity 27% off the model's crossing on the very same
trace in one run and within 3% in the next, with the model unchanged (bench/README.md). No
bound on a p95 near capacity means anything in a few minutes. So the test checks the model
where a short run can tell:

* **means on the measured trace.** The estimator's calibrated step model, simulated on the
  very requests of the ramp (same arrival times, same lengths; ``simulate.replay``), gives
  each step's mean TTFT and mean per-request ITL within ``TRACE_MEAN_TOL``, up to the
  predicted capacity. A mean over 50 requests is not decided by a few of them, and it still
  catches a wrong prefill or decode cost, a wrong batch limit or queueing that is off;
* **p95 on the trace at half the capacity**, within ``TRACE_P95_TOL`` (the ITL tail drifts
  with the machine by tens of percent, so the bound is wide);
* **capacity**: the model's SLO crossing on the trace within a factor ``TRACE_CAPACITY_FACTOR``
  of the measured one, and the estimator's own prediction (fresh simulated traffic, so with
  the arrivals' chance on top) within ``CAPACITY_FACTOR``: sanity bounds that a units error,
  a missing term or a wrong engine limit would break.

The host must not change the engine's speed between the phases. The benchmark's "engine vs
the low phase" column measures it per step (``engine_speed_change``: a step model fitted on
the step's own records against one fitted on the low phase's). Up to the predicted capacity
the batches stay within what the low phase's fit covers (on a steady machine the column read
-3%, +0% and +4% at 0.5, 0.8 and 0.95 C), so a change beyond ``MAX_HOST_DRIFT`` there is the
host, not the model's extrapolation: on one machine of this kind the same engine measured a
capacity of 0.70, 1.28 and 2.0 req/s within 80 minutes; one CI run met an engine 12% slower
at 0.5 C than in its low phase, another one +6% at 0.5 C and then 27-32% faster from 0.8 C
on, so that no step up to 1.44 C missed the SLO (bench/README.md). Such a run cannot judge
the model; the test then runs the whole procedure again on a fresh server, up to
``ATTEMPTS`` times, and judges the first run whose engine held its speed at every step up to
1.0 C; when none did, the run whose engine moved least, on the same bounds except at the
steps where its engine moved beyond ``MAX_HOST_DRIFT`` (listed in the output; the 0.5 C step
must have held, and the capacity bounds are always checked). One CI run met engines 15%, 29%
and 28% off their low phase in three runs in a row: the mean on the trace at such a step
compares the model with another engine.

The engine's own speed sets a floor under the SLO (``accuracy.machine_slo``): at least 2.5
times its idle TTFT of a p95-length prompt and its idle ITL, as fitted on the low phase. On
the machines the 1 s / 60 ms SLO was chosen on, nothing changes; on one that prefilled at
2.3 ms per token, the p95 prompt alone took 0.94 s idle, the predicted capacity at 1 s was
0.13 req/s and the ramp would have run for over half an hour; with the SLO at 2.34 s, 0.83.

The engine gets a core of its own (``Settings.isolate``): vLLM's pinned CPU worker and its
engine-core process on one core, the API server, the proxy and the client on the other, as a
GPU engine has its device to itself. A run that shared the machine (other processes used over
half a core during a step) says nothing about the model: it is skipped, or fails under
``CI=true``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.support import accuracy as ea
from tests.support.real_backends import require, vllm_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRACE_MEAN_TOL = 0.35
TRACE_P95_TOL = 0.45
TRACE_CAPACITY_FACTOR = 1.6
CAPACITY_FACTOR = 2.0
MAX_OTHER_CORES = 0.5
MAX_HOST_DRIFT = 0.10
ATTEMPTS = 3


def host_drift(out: ea.Outcome_) -> tuple[float, str]:
    """The largest engine speed change against the low phase among the steps up to the
    predicted capacity (a step without a fit counts as held), and where it was."""
    moved = [
        (abs(st.engine_speed_change), f"{st.engine_speed_change:+.0%} at {st.factor:.2f} C")
        for st in out.steps
        if st.factor <= 1.0 + 1e-9 and not math.isnan(st.engine_speed_change)
    ]
    return max(moved, default=(0.0, "no step fitted"))


@pytest.mark.timeout(3000)  # up to ATTEMPTS runs of 5-12 minutes, depending on the engine
def test_estimator_predicts_real_vllm_capacity_and_latency(
    require_vllm: None, tmp_path: Path
) -> None:
    require(vllm_available(ea.MODEL_DIR))
    runs: list[tuple[float, str, ea.Outcome_, str]] = []
    for attempt in range(1, ATTEMPTS + 1):
        out = ea.run(ea.Settings.test(), keep_dir=tmp_path / f"attempt{attempt}")
        table = ea.render(out)
        print(table)
        drift, where = host_drift(out)
        runs.append((drift, f"attempt {attempt}: engine {where} vs its low phase", out, table))
        if drift <= MAX_HOST_DRIFT:
            break
        print(f"the host changed the engine's speed ({runs[-1][1]}); running again")
    else:  # the host moved the engine in every run: judge the steadiest, where it held
        print("the engine's speed changed between the phases in every attempt:\n"
              + "\n".join(r[1] for r in runs))  # fmt: skip
    _, _, out, table = min(runs, key=lambda r: r[0])
    busy = max(st.other_cpu_cores for st in [out.low, *out.steps])
    if busy > MAX_OTHER_CORES:
        require(f"other processes used {busy:.2f} cores during the run:\n{table}")
    assert out.prediction.fit_source == "calibrated", table
    assert all(st.n_ok == st.n for st in [out.low, *out.steps]), table
    assert out.measured_capacity_rps is not None, f"no SLO crossing measured\n{table}"
    steady = any(r[0] <= MAX_HOST_DRIFT for r in runs)

    def judged(st: ea.StepResult) -> bool:
        """The step's engine held its low-phase speed (always, in a steady run)."""
        change = st.engine_speed_change
        return steady or math.isnan(change) or abs(change) <= MAX_HOST_DRIFT

    upto_c = [st for st in out.steps if st.factor <= 1.0 + 1e-9]
    skipped = [f"{st.factor:.2f} C (engine {st.engine_speed_change:+.0%})"
               for st in upto_c if not judged(st)]  # fmt: skip
    if skipped:
        print("not judged, the host moved the engine there: " + ", ".join(skipped))
    assert judged(upto_c[0]), f"the engine moved at {upto_c[0].factor:.2f} C in every run\n{table}"
    problems = []
    for st in filter(judged, upto_c):
        for what, err in zip(("TTFT", "ITL"), ea.trace_mean_errors(st), strict=True):
            if not abs(err) <= TRACE_MEAN_TOL:
                problems.append(f"mean {what} at {st.factor:.2f} C on the trace: {err:+.0%}")
    checks = {c["name"]: c for c in out.checks}
    for name in ("ttft_p95_s@0.5C", "itl_p95_s@0.5C"):  # upto_c[0] is the 0.5 C step: judged
        err = checks[name]["replay_error"]
        if not abs(err) <= TRACE_P95_TOL:
            problems.append(f"{name} on the trace: {err:+.0%}")
    cap = checks["capacity_rps"]
    for what, factor in (("replay", TRACE_CAPACITY_FACTOR), ("predicted", CAPACITY_FACTOR)):
        ratio = (cap[what] or 0.0) / cap["measured"]
        if not 1 / factor <= ratio <= factor:
            problems.append(f"capacity ({what}): x{ratio:.2f} the measured")
    assert not problems, "\n".join([*problems, table])
