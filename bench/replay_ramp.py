"""Replay a kept accuracy run (``estimator_accuracy.py --keep DIR``) against a step model
fitted offline: the measured requests of each ramp step (same arrival times and lengths),
simulated with the calibrator's fit of the low-rate phase, and the step's measured p95 and
mean TTFT / ITL beside the model's. This separates model error from chance (the same
requests on both sides) and lets a change to the calibrator or the simulator be judged on a
real run without running the engine again.

    python3 bench/replay_ramp.py DIR                  # the estimator as it is
    python3 bench/replay_ramp.py DIR --no-attention   # the calibrator without its attention term
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT),):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from estimator.calibrate import CalibratorConfig, OnlineCalibrator  # noqa: E402
from estimator.catalog import load_gpu_catalog  # noqa: E402
from estimator.projection import (  # noqa: E402
    choose_step,
    engine_limits,
    engine_observed,
)
from estimator.records import BackendSnapshot, Outcome  # noqa: E402
from estimator.settings import EstimatorConfig  # noqa: E402
from estimator.simulate import replay  # noqa: E402
from tests.support import accuracy as ea  # noqa: E402


def load_sent(path: Path) -> dict[int, list[tuple[float, ea.Sent]]]:
    ramps: dict[int, list[tuple[float, ea.Sent]]] = {}
    for line in path.read_text().splitlines():
        d = json.loads(line)
        ramp, factor = int(d.pop("ramp")), float(d.pop("factor"))
        d.pop("rate")
        ramps.setdefault(ramp, []).append((factor, ea.Sent(**d)))
    return ramps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--no-attention", action="store_true",
                    help="fit without the prefill attention term")  # fmt: skip
    ap.add_argument("--jitter", type=float, help="replace the fitted jitter sigma")
    a = ap.parse_args(argv)
    snap = BackendSnapshot.from_dict(json.loads((a.dir / "snapshot.json").read_text()))
    records = [r for r in ea.read_records(a.dir / "requests.jsonl", "low")
               if r.outcome is Outcome.OK]  # fmt: skip
    cfg = EstimatorConfig(max_num_seqs=snap.max_num_seqs or 8)
    cal_cfg = CalibratorConfig(fit_attention=not a.no_attention)
    cal = OnlineCalibrator(config=cal_cfg)
    for r in records:
        cal.observe(r)
    fit = cal.fit(max_num_seqs=cfg.max_num_seqs)
    step, source, _ = choose_step(fit, None, cfg.min_records)
    assert step is not None
    if a.jitter is not None:
        step = replace(step, jitter_sigma=a.jitter)
    # the vLLM CPU server's limits: its exposed KV blocks, else its CPU build's defaults
    cpu = load_gpu_catalog()["cpu"]
    limits, _ = engine_limits(engine_observed([snap]), None, cfg, 0.0, cpu)
    print(f"{len(records)} low-phase records; fit ({source}): c0 {step.overhead_s * 1e3:.2f} ms, "
          f"c_p {step.prefill_s_per_token * 1e6:.1f} us/token, c_d "
          f"{step.decode_s_per_seq * 1e6:.1f} us, c_kv {step.kv_s_per_token * 1e9:.2f} ns, "
          f"attention {step.prefill_attn_s_per_pair * 1e9:.3f} ns/pair, jitter "
          f"{step.jitter_sigma:.3f}, fit error TTFT {fit.ttft_mare or math.nan:.3f}, "
          f"ITL {fit.itl_mare or math.nan:.3f}")  # fmt: skip
    s = ea.Settings(max_num_seqs=cfg.max_num_seqs)
    print(f"{'step':>6} {'n':>4} {'TTFT p95 meas/model':>22} {'ITL p95 meas/model':>22} "
          f"{'TTFT mean meas/model':>22} {'ITL mean meas/model':>22}")  # fmt: skip
    for _, rows in sorted(load_sent(a.dir / "ramp_sent.jsonl").items()):
        sent = [x for _, x in rows]
        t_0 = sent[0].arrival
        rep = replay(step, limits, [r.arrival - t_0 for r in sent],
                     [r.prompt_len for r in sent], [r.max_tokens for r in sent])  # fmt: skip
        lo = 0
        factors = [f for f, _ in rows]
        while lo < len(rows):
            hi = lo
            while hi < len(rows) and factors[hi] == factors[lo]:
                hi += 1
            end = sent[hi].arrival if hi < len(sent) else math.inf
            st = ea.summarise_step(sent, lo, hi, 0.0, factors[lo], s, window_end=end)
            st = ea.with_replay(st, rep, lo, hi, end - t_0, s)

            def pair(m: float, p: float) -> str:
                return f"{m * 1e3:8.1f}/{p * 1e3:6.1f} {(p / m - 1):+5.0%}"

            ttft95 = pair(st.ttft_p95_s, st.replay_ttft_p95_s)
            print(f"{factors[lo]:>5.2f}C {hi - lo:>4} {ttft95:>22} "
                  f"{pair(st.itl_p95_s, st.replay_itl_p95_s):>22} "
                  f"{pair(st.ttft_mean_s, st.replay_ttft_mean_s):>22} "
                  f"{pair(st.itl_mean_s, st.replay_itl_mean_s):>22}")  # fmt: skip
            lo = hi
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
