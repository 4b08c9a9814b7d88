"""Cost figures: $/h, $/month, split of cost between input and output tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estimator.cost import (
    HOURS_PER_MONTH,
    TokenTimes,
    cost_figures,
    deployment_usd_per_hour,
    input_share,
    token_times,
)


class LinearStep:
    """A fake step model: fixed overhead, per prefill token, per decode seq, per context token."""

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return 0.005 + 1e-5 * prefill_tokens + 2e-4 * decode_seqs + 1e-7 * context_tokens


@pytest.mark.parametrize(("price", "gpus", "replicas", "want"),
                         [(2.0, 1, 1, 2.0), (2.0, 4, 3, 24.0), (0.5, 8, 0, 0.0)],
                         ids=["one", "tp4x3", "none"])  # fmt: skip
def test_usd_per_hour(price: float, gpus: int, replicas: int, want: float) -> None:
    assert deployment_usd_per_hour(price, gpus, replicas) == pytest.approx(want)


def test_token_times_from_step_model() -> None:
    t = token_times(LinearStep(), decode_batch=10, mean_context=1000)
    assert t.prefill_s == pytest.approx(1e-5)
    assert t.decode_s == pytest.approx((0.005 + 10 * 2e-4 + 1e-7 * 10_000) / 10)
    assert t.decode_s > t.prefill_s  # decode tokens are the expensive ones


def test_figures_by_hand() -> None:
    times = TokenTimes(prefill_s=1.0, decode_s=4.0)
    c = cost_figures(usd_per_hour=3.6, rate_rps=1.0, mean_prompt_tokens=400,
                     mean_output_tokens=100, times=times, capacity_rps=4.0)  # fmt: skip
    assert c.input_share == pytest.approx(0.5)
    assert c.usd_per_month == pytest.approx(3.6 * HOURS_PER_MONTH)
    assert c.usd_per_request == pytest.approx(0.001)
    assert c.usd_per_1m_input_tokens == pytest.approx(0.0005 / 400 * 1e6)
    assert c.usd_per_1m_output_tokens == pytest.approx(0.0005 / 100 * 1e6)
    assert c.usd_per_1m_tokens == pytest.approx(0.001 / 500 * 1e6)
    assert c.utilization == pytest.approx(0.25)


def test_no_traffic_means_unknown_per_unit_cost() -> None:
    c = cost_figures(usd_per_hour=2.0, rate_rps=0.0, mean_prompt_tokens=100, mean_output_tokens=10)
    assert c.usd_per_request is None and c.usd_per_1m_tokens is None and c.utilization is None


def test_cached_prompt_tokens_lower_the_input_share() -> None:
    t = TokenTimes(prefill_s=1.0, decode_s=5.0)
    assert input_share(t, prompt_tokens=1000, output_tokens=100, cached_ratio=0.8) < input_share(
        t, prompt_tokens=1000, output_tokens=100
    )


@given(
    price=st.floats(0.1, 100), capacity=st.floats(0.1, 1000),
    u1=st.floats(0.01, 2.0), u2=st.floats(0.01, 2.0),
    prompt=st.floats(1, 10_000), output=st.floats(1, 4096),
)  # fmt: skip
def test_cost_per_token_falls_with_utilization_until_capacity(
    price: float, capacity: float, u1: float, u2: float, prompt: float, output: float
) -> None:
    lo, hi = sorted((u1, u2))

    def per_token(u: float) -> float:
        c = cost_figures(usd_per_hour=price, rate_rps=u * capacity, mean_prompt_tokens=prompt,
                         mean_output_tokens=output, capacity_rps=capacity)  # fmt: skip
        assert c.usd_per_1m_tokens is not None and c.usd_per_1m_output_tokens is not None
        return c.usd_per_1m_tokens

    a, b = per_token(lo), per_token(hi)
    assert b <= a * (1 + 1e-9)
    if hi <= 1.0 and hi > lo * 1.01:
        assert b < a
    if lo >= 1.0:
        assert a == pytest.approx(b)  # beyond capacity the price floor holds


@given(share_p=st.floats(0, 1e4), share_o=st.floats(0, 1e4), cached=st.floats(0, 1))
def test_input_share_is_a_ratio(share_p: float, share_o: float, cached: float) -> None:
    s = input_share(TokenTimes(prefill_s=1e-4, decode_s=1e-2), prompt_tokens=share_p,
                    output_tokens=share_o, cached_ratio=cached)  # fmt: skip
    assert 0.0 <= s <= 1.0
