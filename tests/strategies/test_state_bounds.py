"""`recycled`'s pool of recycled KV against the server's bound (strategies/base.py STATE_BYTES_LIMIT_ENV):
what a request reserves, growth capped by the bound, shrinking with live buffers moved intact, and
nothing held once the worker is idle."""

import torch

from strategies import registry
from strategies.base import STATE_BYTES_LIMIT_ENV

from synthetic_kv import MODEL, attention_reference, block_table, make_kv, random_query, run_step, step_rows

Recycled = registry.get("recycled")
TOL = dict(atol=2e-5, rtol=1e-4)


def pool_bytes(strategy) -> int:
    return sum(t.nbytes for pool in strategy.pools.values() for t in pool)


def test_request_state_bytes_counts_the_pages_a_request_takes():
    params = Recycled.Params(k=100, stride=4)
    strategy = Recycled(MODEL)
    kv, table = make_kv(), block_table([300])
    run_step(strategy, step_rows([params], [1], [200], table), random_query(1, 1), kv)
    pages = len(strategy.state("req-0").pages)
    assert pages == -(-(100 + 4 + 1) // Recycled.POOL_PAGE)
    assert Recycled.request_state_bytes(params, 200, MODEL) == pages * Recycled.pool_page_bytes(MODEL)
    # every layer's pool holds K and V for every page
    assert strategy.held_bytes() == pool_bytes(strategy) == strategy.pool_pages * Recycled.pool_page_bytes(MODEL)
    # a fractional k is resolved at the context it is given
    assert Recycled.request_state_bytes(Recycled.Params(k=0.5, stride=4), 1000, MODEL) == \
        -(-(500 + 5) // Recycled.POOL_PAGE) * Recycled.pool_page_bytes(MODEL)


def test_pool_growth_stops_at_the_server_bound(monkeypatch):
    page_bytes = Recycled.pool_page_bytes(MODEL.whole_model())
    monkeypatch.setenv(STATE_BYTES_LIMIT_ENV, str(10 * page_bytes))
    strategy = Recycled(MODEL)
    kv, table = make_kv(), block_table([700, 700])
    params = [Recycled.Params(k=6 * 64 - 5, stride=4), Recycled.Params(k=3 * 64 - 5, stride=4)]
    run_step(strategy, step_rows(params[:1], [1], [600], table[:1], ["a"]), random_query(1, 1), kv)
    assert strategy.pool_pages == 6
    run_step(strategy, step_rows(params, [1, 1], [601, 600], table, ["a", "b"]), random_query(2, 2), kv)
    assert strategy.pool_pages == 10        # doubling would give 12
    assert strategy.held_bytes() <= 10 * page_bytes


def test_pool_shrinks_keeping_live_buffers_and_is_freed_when_idle():
    """Four requests share the pool; three end, so the pool shrinks and the fourth's pages move to its
    front; the fourth's sparse steps (read from the moved buffer) still equal attention over its
    selection plus the new tokens. When it ends nothing is held."""
    strategy = Recycled(MODEL)
    kv = make_kv(num_blocks=64)
    lens = [200, 210, 220, 230]
    table = block_table([n + 8 for n in lens], num_blocks=64)
    ids = [f"r{i}" for i in range(4)]
    params = [Recycled.Params(k=100, stride=8)] * 4
    for step in range(2):   # a full step, then a sparse one
        run_step(strategy, step_rows(params, [1] * 4, [n + 1 + step for n in lens], table, ids),
                 random_query(4, step), kv)
    assert strategy.pool_pages == 8
    for rid in ids[:3]:
        strategy.release(rid)
    survivor = strategy.state("r3")
    assert strategy.pool_pages == 4 and sorted(survivor.pages) == [0, 1]
    assert strategy.held_bytes() == 4 * Recycled.pool_page_bytes(MODEL)
    for step in range(2, 5):
        seq = lens[3] + 1 + step
        rows = step_rows(params[:1], [1], [seq], table[3:], ["r3"])
        query = random_query(1, 10 + step)
        chosen = {hk: set(survivor.sel_idx[0][hk].tolist()) | set(range(survivor.full_len[0], seq))
                  for hk in range(MODEL.num_kv_heads)}
        expected = attention_reference(query, kv, rows, lambda b, q_pos, hk: torch.tensor(
            [t in chosen[hk] for t in range(seq)]))
        out = run_step(strategy, rows, query, kv, layers=range(1))[0]
        torch.testing.assert_close(out, expected, **TOL)
    strategy.release("r3")
    assert strategy.pool_pages == 4        # kept for the next request while the worker has others
    strategy.free_idle()
    assert strategy.pool_pages == 0 and strategy.held_bytes() == 0 and not strategy.free_pages
