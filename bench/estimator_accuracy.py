"""Estimator accuracy against a real engine (issue 4, "Proof").

A real vLLM CPU server (the 84M model, ``--max-num-seqs 8``) runs behind the proxy with its
request log on. Then:

1. **low-rate phase**: open-loop Poisson traffic at a low rate (about a quarter of the
   capacity) through the proxy; the proxy writes one ``RequestRecord`` per request;
2. **prediction**: those records (and one ``BackendSnapshot`` with the server's
   ``cache_config_info``: block size and number of KV blocks) are replayed into an
   ``Estimator`` (``replay_records``): its report gives the capacity at the SLO. The p95 TTFT
   and ITL at two other rates (50% and 80% of the predicted capacity) are simulated on the
   numbers behind that very report (``Estimator.projection(model).basis``: the step model,
   engine limits, workload and capacity ``estimator.projection.project`` used), so they are
   the estimator's path and not a copy of it;
3. **measurement**: an open-loop ramp of Poisson steps (a fixed number of requests per step,
   the server drained between steps) at rates around the prediction, 50% and 80% of it
   included; per step the client measures p95 TTFT and p95 ITL. The measured capacity is the
   rate at which ``s = max(ttft_p95 / slo_ttft, itl_p95 / slo_itl)`` first crosses 1, linearly
   interpolated between the last step that met the SLO and the first that did not (the ramp
   extends up or down when the crossing is outside it);
4. **report**: predicted vs measured with relative errors; PASS when the capacity is within
   15% and the p95 TTFT and ITL at the two rates within 20% (the issue's targets).

Definitions (the same on both sides):

* TTFT: from sending the request to the first chunk that carries a generated token (its text
  may be empty); the simulator's is arrival to the end of the prefill step.
* ITL: pooled per-token gaps. The client asks for ``stream_options.continuous_usage_stats``
  (cumulative token counts on every chunk): a read that brings ``k`` new tokens after a gap
  ``g`` counts ``k`` gaps of ``g / k`` (the proxy's own rule for reads with several events;
  under load vLLM's API server sends the tokens of several steps in one chunk). The
  simulator's ITL quantile is token-weighted over decode step durations: the same thing.
* Warm-up: per step the first 10% of requests are left out of the TTFT statistics, and ITL
  gaps ending before the first counted arrival are left out, as in ``estimator.simulate``;
  the step runs until its last request ends (the drain is counted, as in the simulator).

Traffic: ``/v1/completions`` with prompts of random token ids (no shared prefix, so prefix
caching finds nothing: the first 128-token block of every prompt is random), prompt lengths
lognormal (median 220, sigma 0.45, clipped to 100-600 tokens), output lengths uniform 32-128
with ``ignore_eos`` (exact lengths), temperature 1 (greedy decoding of the random-weight
model can loop on byte tokens that never complete a character, leaving the text empty). The
proxy runs with scheduling off (a pass-through: vLLM's own FCFS queue does the queueing, which
is what the simulator models) and its in-process estimator off (its refresh would take CPU
from the engine on this 2-core machine; the benchmark runs the estimator on the logged
records instead).

    python3 bench/estimator_accuracy.py --json out.json   # full: about 9 minutes
    python3 bench/estimator_accuracy.py --quick           # about 5 minutes
    python3 bench/estimator_accuracy.py --seeds 1,2,3     # three full runs, pooled

Beside the issue's comparison (the estimator's prediction for fresh Poisson traffic against
one measured ramp) the report gives two columns that separate model error from chance:
"chance alone" (the relative standard deviation, over simulations with fresh arrivals, of
the same quantity measured with steps as short as the ramp's: 8 for capacity, 40 for the
latencies, whose 5th-95th percentile range is shown too, with whether the measurement fell
inside it) and "model on the measured trace" (the calibrated step model simulated on the
very requests of the ramp, same arrival times and lengths: ``estimator.simulate.replay``). A
per-step "other processes" column is the CPU that processes other than the engine, the
proxy and the client used during the step, and "engine vs the low phase" how much slower (+)
or faster (-) the engine itself ran during the step than while the estimator learned (a step
model fitted on the step's own records against one fitted on the low phase's, for the same
reference request: ``engine_speed_change``). The host's drift, which no prediction made from
the low phase can know, shows there.

Several seeds (``--seeds 1,2,3``): one whole run per seed, then the issue's targets judged on
the planned ramp steps pooled across the runs, by rate as a fraction of each run's own
prediction (``Pooled``). Near capacity a single run's p95 is decided by a few bursts of
arrivals; the pool is what a longer measurement at that rate gives, and that is what the
estimator predicts. Each run's own errors are listed beside the pooled ones.

Isolation (on by default, ``--no-isolate`` to turn off): vLLM's CPU worker pins itself to
one core; the benchmark moves its engine-core process there too, and the API server, the
proxy and this client onto the other core(s), as a GPU engine has its device to itself.
Without it, the per-token HTTP work of those processes preempts engine steps more and more
as the load grows, a property of this 2-core test bed rather than of the engine, which no
model calibrated at low load can know.

Exit status 1 when a target fails. Needs ``.ci/install_backends.sh`` (vLLM CPU venv, models).
Measure on a quiet machine: other heavy processes change the engine's speed between the
low-rate phase and the ramp; the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.accuracy import (  # noqa: E402
    MIXES,
    MODEL_DIR,
    MODEL_SHAPES,
    Settings,
    _clean,
    _step_json,
    pool,
    render,
    render_pooled,
    run,
    to_json,
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="shorter phases (about 4 minutes)")
    ap.add_argument(
        "--long", action="store_true", help="long steps (about 20 minutes; see Settings.long)"
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--slo-ttft", type=float, help="p95 TTFT target, s")
    ap.add_argument("--slo-itl", type=float, help="p95 ITL target, s")
    ap.add_argument("--low-rate", type=float, help="req/s of the low-rate phase")
    ap.add_argument("--low-requests", type=int)
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument(
        "--seeds",
        help="comma-separated seeds: one whole run per seed (a fresh server each), then the "
        "targets judged on their steps pooled (see Pooled); the exit status follows the pool",
    )
    ap.add_argument(
        "--prior",
        action="store_true",
        help="give the estimator the model config and the cpu catalog entry",
    )
    ap.add_argument("--model", help=f"model to serve: {MODEL_DIR} (default) or "
                    f"{', '.join(MODEL_SHAPES)} (made on first use)")  # fmt: skip
    ap.add_argument("--mix", choices=sorted(MIXES), help="length mix instead of the default "
                    "lognormal prompts / uniform outputs")  # fmt: skip
    ap.add_argument("--keep", metavar="DIR", help="keep the request log in DIR")
    ap.add_argument("--nice", type=int, default=0, help="renice this process (and children)")
    ap.add_argument(
        "--no-isolate", action="store_true", help="let the engine share its core (see Settings)"
    )
    a = ap.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    kw: dict[str, Any] = {
        k: v
        for k, v in {
            "slo_ttft_s": a.slo_ttft,
            "slo_itl_s": a.slo_itl,
            "low_rate": a.low_rate,
            "low_requests": a.low_requests,
            "max_num_seqs": a.max_num_seqs,
            "seed": a.seed,
        }.items()
        if v is not None
    }
    if a.prior:
        kw["use_prior"] = True
    if a.no_isolate:
        kw["isolate"] = False
    if a.model:
        kw["model"] = a.model
    if a.mix:
        kw["prompt_choices"], kw["output_choices"] = MIXES[a.mix]
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [kw.pop("seed", 1)]
    started = time.monotonic()
    outcomes = []
    for seed in seeds:
        preset = Settings.quick if a.quick else Settings.long if a.long else Settings
        s = preset(seed=seed, **kw)
        keep = Path(a.keep) / f"seed{seed}" if a.keep and len(seeds) > 1 else a.keep
        o = run(s, keep_dir=Path(keep) if keep else None)
        outcomes.append(o)
        print()
        print(render(o))
        print(f"total {time.monotonic() - started:.0f} s")
    checks = outcomes[0].checks
    doc: dict[str, Any] = to_json(outcomes[0])
    if len(outcomes) > 1:
        pooled = pool(outcomes)
        print()
        print(render_pooled(pooled))
        checks = pooled.checks
        doc = {
            "runs": [to_json(o) for o in outcomes],
            "pooled": _clean({**asdict(pooled), "steps": [_step_json(x) for x in pooled.steps]}),
        }
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {a.json}")
    ok = all(c["ok"] for c in checks)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
