"""bench/e2e.py's two timings, on hand-made token arrival times (the benchmark itself runs no test)."""

import math
import statistics

import pytest

from bench.e2e import median_ttft, steady_decode_tpot


def test_ttft_is_the_median_time_from_sending_to_the_first_token():
    sent = [0.0, 0.0, 1.0]
    tokens = [[2.0, 2.1], [5.0, 5.1], [4.0, 4.1]]
    assert median_ttft(sent, tokens) == pytest.approx(3.0)      # 2, 5 and 3 s


def test_decode_time_per_token_counts_only_the_window_where_every_request_decodes():
    # request 0 decodes from t=1 every 0.1 s; request 1's prefill ends at t=2, then every 0.2 s
    a = [1.0 + 0.1 * i for i in range(30)]          # 1.0 .. 3.9
    b = [2.0 + 0.2 * i for i in range(10)]          # 2.0 .. 3.8
    tpot = steady_decode_tpot([a, b])
    # window (2.0, 3.8]: request 0 gets 18 tokens (1.8 s / 0.1), request 1 gets 9 (1.8 s / 0.2)
    assert tpot == pytest.approx(statistics.median([1.8 / 18, 1.8 / 9]), rel=0.06)


def test_no_steady_window_gives_nan():
    # request 0 finished before request 1's first token (the batch's prefills did not overlap its decode)
    assert math.isnan(steady_decode_tpot([[1.0, 1.1, 1.2], [2.0, 2.1]]))



def test_own_param_budget_sets_each_strategys_budget_param():
    """`--budget-is params` (how the earlier tables were made): the strategy's own budget param at the
    budget, as a fraction where the param takes one, else in tokens of the prompt."""
    from bench.e2e import own_param_config

    assert own_param_config("sink", 0.125, 2048, {}).attention() == {"strategy": "sink",
                                                                    "params": {"window": 256}}
    assert own_param_config("seer", 0.125, 2048, {"prefill": "dense"}).attention() == {
        "strategy": "seer", "params": {"prefill": "dense", "top_k": 0.125}}
    assert own_param_config("full", 0.125, 2048, {}).attention() == {"strategy": "full", "params": {}}
