"""Per-request attention inside the real vLLM engine (embedded model, real kernels): routing,
budgets, reported stats, sink's KV release, and request-state lifetime."""

from __future__ import annotations

import math

import pytest

from strategies.engine import stats as stats_io
from tests.e2e.conftest import assert_same_greedy, fresh_prompts
from strategies.base import causal_pairs
from strategies.sink import sink_visible_pairs

pytestmark = pytest.mark.timeout(600)


def sampling(attention: dict | None, max_tokens: int, logprobs: int | None = None, ignore_eos: bool = True):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos, logprobs=logprobs,
                          extra_args={"attention": attention} if attention is not None else None)


def generate(engine, prompts: list[list[int]], params: list, salt: str | None = None) -> list:
    outs = engine.llm.generate(fresh_prompts(prompts, salt), params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def strategies_small(seer_gates: str) -> dict[str, dict]:
    """A 1/8 budget for every sparse strategy."""
    return {
        "sink": {"strategy": "sink", "params": {"n_sink": 4, "window": 192}},
        "recycled": {"strategy": "recycled", "params": {"k": 0.125, "stride": 16, "refresh_threshold": None}},
        "landmark": {"strategy": "landmark", "params": {"block_size": 16, "k_blocks": 0.125, "dense_layers": 0}},
        "seer": {"strategy": "seer", "params": {"block_size": 32, "top_k": 0.125, "gates": seer_gates}},
    }


def test_a_row_does_not_depend_on_the_strategies_of_the_other_rows(engine, text_tokens, seer_gates):
    """Each row of a mixed batch gives exactly the tokens it gives in the same batch (same prompts, same
    order: vLLM's CPU path is not batch-invariant, so only the same batch shape is compared) where the
    rows of every other strategy run ``full`` instead."""
    small = strategies_small(seer_gates)
    choices = [None, {"strategy": "full", "params": {}}, *small.values(),
               small["sink"] | {"params": {"n_sink": 16, "window": 300}},
               small["landmark"] | {"params": {"block_size": 32, "k_blocks": 8, "dense_layers": 2}},
               small["seer"] | {"params": {"block_size": 32, "threshold": 5e-3, "gates": seer_gates}}]
    prompts = [text_tokens[97 * i: 97 * i + 500 + 40 * i] for i in range(len(choices))]
    # Every call prefills every row afresh (its own prefix-cache salt): with a shared salt the later calls'
    # `full` rows hit the cache and prefill only their tails, another batch shape than the first call's
    # (on a bf16 CPU that moved a seer row's second token)
    mixed = [o.token_ids for o in generate(engine, prompts, [sampling(c, 4) for c in choices])]
    strategy_of = [(c or {"strategy": "full"})["strategy"] for c in choices]
    for name in dict.fromkeys(strategy_of):
        alone = [c if s == name else {"strategy": "full", "params": {}} for c, s in zip(choices, strategy_of)]
        control = [o.token_ids for o in generate(engine, prompts, [sampling(c, 4) for c in alone])]
        for i in (i for i, s in enumerate(strategy_of) if s == name):
            assert list(mixed[i]) == list(control[i]), f"{choices[i]}: mixed {mixed[i]} != among full {control[i]}"


def test_budget_covering_the_context_gives_full_attention(engine, text_tokens, seer_gates):
    """At a budget covering the whole context every strategy attends what ``full`` attends: the same
    tokens and logprobs as ``full`` in the same batch, within the float spread of a different kernel."""
    prompt = text_tokens[:800]
    whole = [{"strategy": "sink", "params": {"n_sink": 4, "window": 8192}},
             {"strategy": "recycled", "params": {"k": 1.0, "stride": 4}},
             {"strategy": "landmark", "params": {"k_blocks": 1.0, "dense_layers": 0}},
             {"strategy": "seer", "params": {"block_size": 32, "top_k": 1.0, "gates": seer_gates}}]
    full, *outs = generate(engine, [prompt] * (1 + len(whole)),
                           [sampling(c, 4, logprobs=2) for c in [{"strategy": "full", "params": {}}, *whole]])
    for choice, out in zip(whole, outs):
        assert_same_greedy(out, full, f"{choice}")


def _logprob_gap(a, b) -> float:
    """Largest |logprob| difference of the tokens both chose, inf when the tokens differ."""
    if list(a.token_ids) != list(b.token_ids):
        return math.inf
    return max(abs(x[t].logprob - y[t].logprob) for t, x, y in zip(a.token_ids, a.logprobs, b.logprobs))


def test_small_budget_differs_from_full_and_reports_its_fraction(engine, text_tokens, seer_gates, monkeypatch):
    monkeypatch.setenv(stats_io.ENV_DIR, str(engine.stats_dir))
    prompt = text_tokens[2000:3600]
    n_new = 5
    small = strategies_small(seer_gates)
    names = ["full", *small]
    choices = [{"strategy": "full", "params": {}}, *small.values()]
    outs = engine.llm.generate(fresh_prompts([prompt] * len(choices)),
                               [sampling(c, n_new, logprobs=1) for c in choices], use_tqdm=False)
    reports = {n: stats_io.read_stats(o.request_id) for n, o in zip(names, outs)}
    gens = {n: o.outputs[0] for n, o in zip(names, outs)}
    for name in small:
        assert _logprob_gap(gens[name], gens["full"]) > 1e-3, f"{name} with a 1/8 budget equals full"
        assert reports[name] is not None and reports[name]["strategy"] == name

    assert reports["full"]["attended_fraction"] == reports["full"]["decode_attended_fraction"] == 1.0
    p, w, steps = len(prompt), 192, range(1, n_new)     # the first token comes from the prefill step
    prefill_pairs, decode_total = causal_pairs(0, p), sum(p + i for i in steps)

    def overall(prefill_attended: float, decode_fraction: float) -> float:
        return (prefill_attended + decode_fraction * decode_total) / (prefill_pairs + decode_total)

    # sink: exact. Windowed prefill pairs + per decode step n_sink + window tokens.
    sink_decode = sum(min(p + i, 4 + w) for i in steps) / decode_total
    assert reports["sink"]["decode_attended_fraction"] == pytest.approx(sink_decode, rel=1e-6)
    assert reports["sink"]["attended_fraction"] == pytest.approx(
        overall(sink_visible_pairs(0, p, 4, w), sink_decode), rel=1e-6)
    # landmark: 1/8 of the chunks + the first and the newest chunk at decode.
    assert reports["landmark"]["decode_attended_fraction"] == pytest.approx(0.125 + 2 * 16 / p, abs=0.02)
    # recycled: the first decode step is a full step, the others keep 1/8 + the tokens since.
    assert reports["recycled"]["decode_attended_fraction"] == pytest.approx((1 + (n_new - 2) * 0.125) / (n_new - 1),
                                                                            abs=0.03)
    # Both leave the prompt to vLLM's dense kernel, which counts every pair it computed (the prompt blocks
    # that `full`'s identical prompt put in the prefix cache are computed by nobody: counted nowhere).
    for name in ("landmark", "recycled"):
        r = reports[name]
        prefill_total = r["total"] - r["decode_total"]
        assert 0 < prefill_total <= prefill_pairs and r["decode_total"] == pytest.approx(decode_total), r
        assert r["attended"] - r["decode_attended"] == pytest.approx(prefill_total), r
    # seer (sparse prefill with a block mask, then decode): about 1/8 of the blocks + the newest.
    assert 0.09 < reports["seer"]["attended_fraction"] < 0.35
    assert 0.09 < reports["seer"]["decode_attended_fraction"] < 0.35
    for o in outs:
        stats_io.discard(o.request_id)
        assert stats_io.read_stats(o.request_id) is None


def test_sink_holds_a_bounded_number_of_kv_blocks(engine, text_tokens):
    """vLLM's own block pool: a sink request's KV stays at sinks + window while it generates."""
    eng = engine.engine
    assert engine.used_blocks() == 0
    prompt = text_tokens[:300]
    window, page, n_new = 64, engine.router().model.kv_block_size, 100
    eng.add_request("sink-blocks", {"prompt_token_ids": prompt},
                    sampling({"strategy": "sink", "params": {"n_sink": 4, "window": window}}, n_new))
    held = []
    while eng.has_unfinished_requests():
        eng.step()
        held.append(engine.used_blocks())
    full_blocks = math.ceil((len(prompt) + n_new) / page)
    bound = 1 + math.ceil(window / page) + 2     # the sink block, the window, the page being filled
    assert max(held[-30:]) <= bound < full_blocks, held
    eng.step()   # delivers the finish to the worker
    assert engine.used_blocks() == 0


def test_many_requests_with_aborts_leave_no_state(engine, text_tokens, seer_gates, monkeypatch):
    monkeypatch.setenv(stats_io.ENV_DIR, str(engine.stats_dir))
    eng = engine.engine
    small = strategies_small(seer_gates)
    cycle = [None, *small.values(), {"strategy": "full", "params": {}}]
    for i in range(200):
        start = (37 * i) % 3000
        prompt = text_tokens[start: start + 16 + (i % 7) * 6]
        eng.add_request(f"churn-{i}", {"prompt_token_ids": prompt},
                        sampling(cycle[i % len(cycle)], 1 + i % 3))
    to_abort = {f"churn-{i}" for i in range(2, 200, 9)}   # 3-token requests, aborted after their first
    aborted = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id in to_abort and not out.finished:
                eng.abort_request([out.request_id])
                to_abort.discard(out.request_id)
                aborted += 1
    assert aborted >= 15
    for _ in range(2):
        eng.step()
    live = engine.router().live_state()
    assert live["tracked"] == 0 and live["leaked"] == 0, live
    assert engine.block_pool.get_usage() == 0.0
    assert engine.used_blocks() == 0
    records = stats_io.read_live_state()
    assert records and all(r["tracked"] == 0 and r["leaked"] == 0 for r in records), records
