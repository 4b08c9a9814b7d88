"""Right-sizing: alternatives search, transfer of calibration, advice."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from estimator import advisor
from estimator.capacity import Slo, max_rate_at_slo
from estimator.catalog import load_gpu_catalog
from estimator.engine import roofline_prior
from estimator.memory import plan_memory
from estimator.modelarch import ModelArch, load_model_arch
from estimator.report import to_dict
from estimator.simulate import EngineLimits, Workload

CONFIGS = Path(__file__).parent / "configs"
CATALOG = load_gpu_catalog()
GPUS = ("t4", "l4", "a100-80gb", "h100-sxm")


@pytest.fixture(scope="module")
def llama8b() -> ModelArch:
    return load_model_arch(CONFIGS / "llama-3.1-8b.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelArch:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
           "intermediate_size": 1024, "vocab_size": 8192, "max_position_embeddings": 4096,
           "torch_dtype": "bfloat16", "tie_word_embeddings": True}  # fmt: skip
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(cfg))
    return load_model_arch(path)


def settings(peak: float, **kw: object) -> advisor.SearchSettings:
    base: dict[str, object] = dict(slo=Slo(ttft_p95_s=1.0, itl_p95_s=0.05), peak_rps=peak,
                                   max_model_len=8192, gpus=GPUS, quants=("bf16",),
                                   max_simulated=8, n_requests=600)  # fmt: skip
    base.update(kw)
    return advisor.SearchSettings(**base)  # type: ignore[arg-type]


WORKLOAD = Workload.fixed(512, 128)


def test_tiny_model_at_low_rate_picks_a_cheap_gpu(tiny: ModelArch) -> None:
    alts = advisor.search(tiny, CATALOG, WORKLOAD, settings(0.5), advisor.Transfer())
    best = alts[0]
    assert best.meets_slo and best.gpu == "t4" and best.gpus_per_replica == 1
    assert best.replicas == 2  # one for the load, one spare
    assert [a.usd_per_hour for a in alts if a.meets_slo] == sorted(
        a.usd_per_hour for a in alts if a.meets_slo
    )


def test_high_rate_picks_a_big_gpu(llama8b: ModelArch) -> None:
    alts = advisor.search(llama8b, CATALOG, WORKLOAD, settings(40.0), advisor.Transfer())
    best = alts[0]
    assert best.meets_slo and best.gpu in ("a100-80gb", "h100-sxm")
    assert best.capacity_rps >= 40.0
    small = [a for a in alts if a.gpu in ("t4", "l4") and a.meets_slo]
    assert all(a.usd_per_hour > best.usd_per_hour for a in small)


def test_every_alternative_carries_numbers_assumptions_and_a_band(llama8b: ModelArch) -> None:
    alts = advisor.search(llama8b, CATALOG, WORKLOAD, settings(2.0), advisor.Transfer())
    for a in alts:
        assert a.assumptions and a.reasons
        if a.meets_slo:
            u = a.uncertainty
            assert u is not None and u.low < a.capacity_rps_per_replica < u.high
            assert u.rel_error == advisor.PRIOR_REL_ERROR
            assert a.usd_per_1m_tokens is not None and a.usd_per_1m_tokens > 0
    json.dumps([to_dict(a) for a in alts], allow_nan=False)


def test_impossible_slo_means_no_option(llama8b: ModelArch) -> None:
    s = settings(1.0, slo=Slo(ttft_p95_s=0.001, itl_p95_s=0.0001))
    current = advisor.Setup(gpu="a100-80gb")
    alts = advisor.search(llama8b, CATALOG, WORKLOAD, s, advisor.Transfer(), current=current)
    assert alts and not any(a.meets_slo for a in alts)
    assert any(a.current for a in alts)
    recs = advisor.advise_alternatives(alts)
    assert [r.kind for r in recs] == ["no_option_meets_slo"] and recs[0].severity == "critical"


def test_weights_that_do_not_fit_are_skipped() -> None:
    arch = load_model_arch(CONFIGS / "llama-2-70b.json")
    found = advisor.candidates(arch, CATALOG, settings(1.0, gpus=("t4", "h100-sxm")),
                               advisor.Transfer())  # fmt: skip
    assert found and all(c.plan.fits for c in found)
    assert all(c.setup.gpus_per_replica >= 2 for c in found if c.setup.gpu == "h100-sxm")
    assert all(c.setup.gpus_per_replica == 8 for c in found if c.setup.gpu == "t4")


def test_capacity_cache_is_reused(tiny: ModelArch) -> None:
    cache: advisor.CapacityCache = {}
    first = advisor.search(tiny, CATALOG, WORKLOAD, settings(0.5), advisor.Transfer(), cache=cache)
    size = len(cache)
    again = advisor.search(tiny, CATALOG, WORKLOAD, settings(0.5), advisor.Transfer(), cache=cache)
    assert size > 0 and len(cache) == size and first == again


def test_calibration_transfers_to_other_gpus(llama8b: ModelArch) -> None:
    prior = roofline_prior(llama8b, CATALOG["a100-80gb"])
    slow = replace(prior, overhead_s=prior.overhead_s * 1.5, decode_s_per_seq=prior.decode_s_per_seq * 1.5,
                   kv_s_per_token=prior.kv_s_per_token * 1.5)  # fmt: skip
    t = advisor.transfer_from(slow, prior, WORKLOAD, rel_error=0.1)
    assert t.decode == pytest.approx(1.5, rel=1e-6) and t.prefill == pytest.approx(1.0, rel=1e-6)
    other = roofline_prior(llama8b, CATALOG["h100-sxm"])
    moved = t.apply(other)
    assert moved.itl_at(8, 600) == pytest.approx(1.5 * other.itl_at(8, 600), rel=1e-6)
    same = t.apply(prior)  # on the calibrated GPU the moved prior reproduces the observations
    assert same.ttft_alone(512) == pytest.approx(slow.ttft_alone(512), rel=1e-6)
    assert same.itl_at(8, 576) == pytest.approx(slow.itl_at(8, 576), rel=1e-6)
    assert t.band() == 0.1 and advisor.Transfer().band() == advisor.PRIOR_REL_ERROR


_EXTRAS = ("prefill_attn_s_per_pair", "request_overhead_s", "api_service_s", "moe_weight_s",
           "moe_topk", "moe_experts", "jitter_sigma", "drift_sigma", "drift_tau_s")  # fmt: skip


@pytest.mark.parametrize("config", ["llama-3.1-8b", "mixtral-8x7b-v0.1", "qwen3-30b-a3b"])
def test_the_transfer_keeps_every_term(config: str) -> None:
    # the roofline prior of an engine has attention, API-server and (MoE) expert terms beside
    # the four coefficients the calibration moves: the transfer scales those four only
    arch = load_model_arch(CONFIGS / f"{config}.json")
    prior = replace(roofline_prior(arch, CATALOG["h100-sxm"], engine="vllm", tp=2),
                    jitter_sigma=0.1, drift_sigma=0.05, drift_tau_s=30.0)  # fmt: skip
    assert prior.request_overhead_s > 0 and prior.prefill_attn_s_per_pair > 0
    moved = advisor.Transfer(prefill=1.2, decode=1.5).apply(prior)
    for name in _EXTRAS:
        assert getattr(moved, name) == getattr(prior, name), name
    assert moved.coefficients() == pytest.approx(
        (1.5 * prior.overhead_s, 1.2 * prior.prefill_s_per_token, 1.5 * prior.decode_s_per_seq,
         1.5 * prior.kv_s_per_token), rel=1e-12)  # fmt: skip


@pytest.mark.parametrize("config", ["llama-3.1-8b", "mixtral-8x7b-v0.1"])
def test_on_the_calibrated_gpu_the_moved_prior_reproduces_the_fit(config: str) -> None:
    # a fit 1.4x slower at decode, 1.2x at prefill, whose attention came out higher than the
    # prior's: on the GPU it was fitted on, the moved prior gives its idle TTFT (every term)
    # and its decode step back, MoE expert streaming included
    arch = load_model_arch(CONFIGS / f"{config}.json")
    gpu = CATALOG["a100-80gb"]
    prior = roofline_prior(arch, gpu, engine="vllm", tp=2)
    fit = replace(prior, overhead_s=prior.overhead_s * 1.4,
                  decode_s_per_seq=prior.decode_s_per_seq * 1.4,
                  kv_s_per_token=prior.kv_s_per_token * 1.4,
                  prefill_s_per_token=prior.prefill_s_per_token * 1.2,
                  prefill_attn_s_per_pair=prior.prefill_attn_s_per_pair * 1.5)  # fmt: skip
    t = advisor.transfer_from(fit, prior, WORKLOAD, rel_error=0.1)
    assert t.decode == pytest.approx(1.4, rel=1e-9)
    same = t.apply(prior)
    assert same.ttft_idle(512) == pytest.approx(fit.ttft_idle(512), rel=1e-9)
    assert same.itl_at(8, 576) == pytest.approx(fit.itl_at(8, 576), rel=1e-9)
    assert same.request_overhead_s == prior.request_overhead_s


# (engine, GPU) -> (max_num_seqs, max_num_batched_tokens, block_size, reserve_output): the
# engine profile's defaults for the device (vLLM's CPU build: 128 sequences, 2048 tokens)
ENGINE_LIMITS = {
    ("vllm", "cpu"): (128, 2048, 128, False),
    ("vllm", "a100-80gb"): (256, 2048, 16, False),
    ("vllm", "h100-sxm"): (1024, 8192, 16, False),
    ("trtllm", "h100-sxm"): (2048, 8192, 32, True),
    ("sglang", "h100-sxm"): (4096, 8192, 1, False),
    ("tgi", "a100-80gb"): (128, 4096, 16, False),
}


@pytest.mark.parametrize(("engine", "gpu"), list(ENGINE_LIMITS),
                         ids=[f"{e}-{g}" for e, g in ENGINE_LIMITS])  # fmt: skip
def test_candidates_get_the_engines_limits(tiny: ModelArch, engine: str, gpu: str) -> None:
    s = settings(1.0, engine=engine)
    c = advisor.make_candidate(tiny, CATALOG[gpu], advisor.Setup(gpu=gpu), s, advisor.Transfer())
    lim = c.limits
    got = (lim.max_num_seqs, lim.max_num_batched_tokens, lim.block_size, lim.reserve_output)
    assert got == ENGINE_LIMITS[(engine, gpu)]
    assert lim.kv_capacity_tokens == c.plan.kv_capacity_tokens
    assert c.step == roofline_prior(tiny, CATALOG[gpu], engine=engine)
    assert any(a.startswith(f"{engine}: max_num_seqs={lim.max_num_seqs}, ")
               for a in advisor._assumptions(c, s, advisor.Transfer()))  # fmt: skip


def test_settings_given_override_the_engines_defaults(tiny: ModelArch) -> None:
    gpu = CATALOG["h100-sxm"]
    s = settings(1.0, engine="trtllm", max_num_seqs=64, max_num_batched_tokens=4096,
                 enforce_eager=True)  # fmt: skip
    c = advisor.make_candidate(tiny, gpu, advisor.Setup(gpu="h100-sxm"), s, advisor.Transfer())
    assert (c.limits.max_num_seqs, c.limits.max_num_batched_tokens) == (64, 4096)
    assert c.plan.cuda_graph_bytes_per_gpu == 0
    assert c.step == roofline_prior(tiny, gpu, engine="trtllm", enforce_eager=True)
    eager = roofline_prior(tiny, gpu, engine="trtllm", enforce_eager=True)
    assert eager.overhead_s > roofline_prior(tiny, gpu, engine="trtllm").overhead_s


def test_capacities_are_cached_per_engine(tiny: ModelArch) -> None:
    cache: advisor.CapacityCache = {}
    one = settings(0.5, gpus=("l4",))
    advisor.search(tiny, CATALOG, WORKLOAD, one, advisor.Transfer(), cache=cache)
    size = len(cache)
    advisor.search(tiny, CATALOG, WORKLOAD, replace(one, engine="trtllm"), advisor.Transfer(),
                   cache=cache)  # fmt: skip
    assert len(cache) == 2 * size


@pytest.mark.parametrize(("tokens", "want"),
                         [(10, 256), (300, 384), (3000, 3072), (4096, 4096), (5000, 6144),
                          (7000, 8192), (100_000, 131072)],
                         ids=["floor", "384", "3k", "4k", "6k", "8k", "128k"])  # fmt: skip
def test_round_len(tokens: float, want: int) -> None:
    assert advisor.round_len(tokens) == want


def observed(**kw: object) -> advisor.Observed:
    base: dict[str, object] = dict(rate_rps=1.0, rate_long_rps=1.0, peak_rps=1.0,
                                   total_tokens_p999=3000.0, replicas=1, max_num_seqs=256,
                                   max_model_len=131072)  # fmt: skip
    base.update(kw)
    return advisor.Observed(**base)  # type: ignore[arg-type]


def test_engine_setting_advice(llama8b: ModelArch) -> None:
    gpu = CATALOG["a100-80gb"]
    plan = plan_memory(llama8b, gpu, max_model_len=8192)
    step = roofline_prior(llama8b, gpu)
    limits = EngineLimits(max_num_seqs=256, kv_capacity_tokens=plan.kv_capacity_tokens)
    cap = max_rate_at_slo(step, limits, WORKLOAD, Slo(ttft_p95_s=1.0, itl_p95_s=0.05),
                          n_requests=600)  # fmt: skip
    seqs = advisor.advise_max_num_seqs(cap, plan, observed())
    assert isinstance(seqs.value, int) and seqs.value % 8 == 0
    assert cap.at_capacity.peak_running <= seqs.value <= max(8, plan.seqs_at_typical_context)
    mml = advisor.advise_max_model_len(observed(), llama8b)
    assert mml is not None and mml.value == 3072 and mml.numbers["model_max"] == 131072
    rep = advisor.advise_replicas(cap.per_replica_rps, observed(peak_rps=10.0), 1, 0.2)
    assert rep.value == math.ceil(10.0 / cap.per_replica_rps) + 1
    assert rep.uncertainty is not None
    assert rep.uncertainty.low <= rep.value <= rep.uncertainty.high
    assert rep.uncertainty.low < rep.uncertainty.high


def test_kv_bound_capacity_suggests_fp8_kv() -> None:
    arch = load_model_arch(CONFIGS / "llama-2-7b.json")  # no GQA: a big KV cache per token
    gpu = CATALOG["l4"]
    plan = plan_memory(arch, gpu, max_model_len=4096)
    step = roofline_prior(arch, gpu)
    limits = EngineLimits(max_num_seqs=256, kv_capacity_tokens=plan.kv_capacity_tokens)
    w = Workload.fixed(2000, 400)
    cap = max_rate_at_slo(step, limits, w, Slo(ttft_p95_s=5.0, itl_p95_s=0.5), n_requests=600)
    assert cap.limiting == "kv" or cap.at_capacity.kv_bound
    rec = advisor.advise_kv_dtype(cap, None, observed())
    assert rec is not None and rec.value == "fp8"
    assert advisor.advise_kv_dtype(cap, None, observed(kv_dtype="fp8")) is None


@pytest.mark.parametrize(("rate", "replicas", "window", "warn"),
                         [(0.1, 3, 20.0, True), (0.5, 3, 3600.0, False), (5.0, 3, 3600.0, False),
                          (0.1, 1, 3600.0, False)],
                         ids=["idle", "busy", "over", "one-replica-needs-its-spare"])  # fmt: skip
def test_underutilized_warning(rate: float, replicas: int, window: float, warn: bool) -> None:
    # capacity 2.0 req/s on `replicas`; the forecast peak is the rate. One replica at a trickle
    # still needs its spare (N+1): "under-utilized" beside "add a replica" contradicted itself
    obs = observed(rate_long_rps=rate, peak_rps=rate, replicas=replicas, rate_long_window_s=window)
    rec = advisor.advise_underused(2.0, obs, 0.2)
    assert (rec is not None) == warn
    if rec is not None:
        assert rec.severity == "warning" and rec.numbers["capacity_rps"] == 2.0
        assert "over the last 20 s" in rec.message  # the data it stands on, not "last hour"


@pytest.mark.parametrize(("replicas", "band", "value", "verdict"),
                         [(1, 0.2, 3, "add 2"), (5, 0.2, 3, "2 fewer would do"),
                          (3, 0.2, 3, "right-sized"), (1, 0.8, None, "uncertain by +-80%")],
                         ids=["add", "fewer", "right", "too-uncertain"])  # fmt: skip
def test_replica_advice_is_one_verdict(replicas: int, band: float, value: int | None,
                                       verdict: str) -> None:  # fmt: skip
    rec = advisor.advise_replicas(1.0, observed(peak_rps=1.5, replicas=replicas), 1, band)
    assert rec.value == value and verdict in rec.message
    assert rec.uncertainty is not None and rec.uncertainty.low <= rec.uncertainty.high
    if value is None:  # no count, but the range it would be in
        assert f"from {rec.uncertainty.low:.0f} to {rec.uncertainty.high:.0f}" in rec.message


def test_oom_risk_warning() -> None:
    arch = load_model_arch(CONFIGS / "llama-3.1-8b.json")
    plan = plan_memory(arch, CATALOG["l4"])  # the full 128k context on a 24 GB card
    rec = advisor.advise_oom(plan)
    assert plan.oom_risk in ("high", "certain")
    assert rec is not None and rec.kind == "oom_risk" and rec.severity in ("warning", "critical")
    assert advisor.advise_oom(plan_memory(arch, CATALOG["h100-sxm"], max_model_len=8192)) is None


def test_a_cheaper_option_is_recommended(tiny: ModelArch) -> None:
    current = advisor.Setup(gpu="h100-sxm")
    alts = advisor.search(tiny, CATALOG, WORKLOAD, settings(0.5), advisor.Transfer(),
                          current=current)  # fmt: skip
    recs = advisor.advise_alternatives(alts)
    assert [r.kind for r in recs] == ["gpu"]
    assert recs[0].numbers["usd_per_hour"] < recs[0].numbers["usd_per_hour_now"]  # type: ignore[operator]
    assert np.isfinite(alts[0].usd_per_hour)
