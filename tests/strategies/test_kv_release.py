"""The scheduler-side KV policy (strategies/engine/kv_release.py) reads each strategy's own description of the KV
it keeps; nothing there names a strategy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from strategies import registry
from strategies.engine import kv_release


def request(attention: dict | None, prompt_tokens: int = 1000):
    extra = {"attention": attention} if attention is not None else None
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), num_prompt_tokens=prompt_tokens)


@pytest.mark.parametrize("name", registry.names())
def test_a_strategy_releases_kv_exactly_when_it_says_which_kv_it_keeps(name):
    cls = registry.get(name)
    kept = cls.kept_kv(cls.Params())
    assert (kept is not None) == cls.releases_kv
    policy = kv_release.policy_of(request({"strategy": name, "params": {}}))
    assert policy.full == (name == registry.FULL)
    assert policy.cacheable_prompt == cls.dense_prefill
    assert (policy.kept_window is not None) == cls.releases_kv
    if kept is not None:
        assert (policy.kept_first_tokens, policy.kept_window) == kept


def test_a_request_that_prefills_densely_shares_the_prefix_cache():
    """seer's ``prefill: dense`` leaves the prompt to vLLM's dense kernel: its prompt KV is what ``full``
    computes, so it may be read from and written to the prefix cache; gated prefill may not."""
    gated = kv_release.policy_of(request({"strategy": "seer", "params": {"prefill": "gated"}}))
    dense = kv_release.policy_of(request({"strategy": "seer", "params": {"prefill": "dense"}}))
    assert (gated.cacheable_prompt, dense.cacheable_prompt) == (False, True)
    assert not dense.full and dense.kept_window is None


def test_a_budget_sets_the_kept_window_as_the_worker_would():
    policy = kv_release.policy_of(request({"strategy": "sink", "params": {"n_sink": 4}, "budget": 0.125}, 1000))
    assert (policy.kept_first_tokens, policy.kept_window) == (4, 125 - 4)
    assert kv_release.policy_of(request(None)) is kv_release.policy_of(request({"strategy": "full", "params": {}}))


def test_released_blocks_lie_between_the_kept_first_tokens_and_the_window():
    policy = kv_release.KvPolicy(False, cacheable_prompt=False, kept_first_tokens=4, kept_window=64)
    # 300 tokens processed, pages of 32: keys < 4 (block 0) and > 300 - 64 = 236 (from block 7) stay
    assert kv_release.released_range(policy, 300, 300, 32, dense_prefill=False) == (1, 7)
    # a dense prefill reads everything until the prompt is done
    assert kv_release.released_range(policy, 200, 300, 32, dense_prefill=True) == (0, 0)
    keep_all = kv_release.KvPolicy(False, cacheable_prompt=True)
    assert kv_release.released_range(keep_all, 300, 300, 32, dense_prefill=False) == (0, 0)
