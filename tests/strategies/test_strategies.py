"""Every strategy on a synthetic paged KV cache: the registry matrix, exactness when the budget covers
the whole context, per-strategy behaviour, and release."""

import math

import pytest
import torch

from strategies import registry
from strategies.base import ParamError
from strategies.seer import SeerGates, resolve_gates

from synthetic_kv import (MODEL, PAGE, attention_reference, block_table, logical_kv, make_kv, random_query, run_step,
                      step_rows)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_strategy(name):
    return registry.get(name)(MODEL)


def default_params(name, gates_dir):
    cls = registry.get(name)
    if name == "seer":   # default params look for <gates dir>/<model>/seer.safetensors
        path = resolve_gates(None, MODEL)
        SeerGates.identity(MODEL, cls.Params().block_size).save(path)
    return cls.Params()


@pytest.mark.parametrize("name", registry.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrix_mixed_batch(name, dtype, gates_dir):
    """Default params: one prefill row (chunked: context 40) + two decode rows; finite, right shape."""
    strategy = make_strategy(name)
    assert strategy.unsupported_reasons(MODEL) == []
    params = default_params(name, gates_dir)
    strategy.validate_for_model(params, MODEL)
    kv = make_kv(dtype=dtype)
    query_lens, seq_lens = [1, 37, 1], [150, 77, 300]
    rows = step_rows([params] * 3, query_lens, seq_lens, block_table(seq_lens))
    query = random_query(sum(query_lens), 0, dtype)
    for out in run_step(strategy, rows, query, kv):
        assert out.shape == query.shape and out.dtype == dtype
        assert torch.isfinite(out.float()).all()
    for rid in rows.request_ids:
        s = strategy.stats(rid)
        assert 0 < s.attended <= s.total + 1e-6
        strategy.release(rid)
    assert_no_request_state(strategy, rows.request_ids)


def assert_no_request_state(strategy, request_ids):
    for value in vars(strategy).values():
        if isinstance(value, dict):
            assert not set(request_ids) & set(value), f"state left in {value.keys()}"
    for rid in request_ids:
        assert strategy.stats(rid).total == 0


FULL_BUDGET = {
    "full": {},
    "sink": {"n_sink": 4, "window": 400},
    "recycled": {"k": 1.0, "stride": 3, "refresh_threshold": None},
    "landmark": {"k_blocks": 1.0, "dense_layers": 0, "block_size": 16},
    "seer": {"threshold": 0.0, "gates": "identity", "block_size": 32},
}


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_whole_context_budget_is_dense(name):
    """Budgets covering the context give the dense result: prefill, then several decode steps."""
    strategy = make_strategy(name)
    params = registry.get(name).Params.from_dict(FULL_BUDGET[name])
    kv = make_kv()
    final = [130, 96]
    table = block_table(final)
    prompt = [120, 90]
    rows = step_rows([params] * 2, prompt, prompt, table)
    query = random_query(sum(prompt), 1)
    for out in run_step(strategy, rows, query, kv):
        torch.testing.assert_close(out, attention_reference(query, kv, rows), **TOL[torch.float32])
    for step in range(6):
        seq = [p + 1 + step for p in prompt]
        rows = step_rows([params] * 2, [1, 1], seq, table)
        query = random_query(2, 10 + step)
        expected = attention_reference(query, kv, rows)
        for out in run_step(strategy, rows, query, kv):
            torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_seer_top_k_covering_every_block_is_dense():
    strategy = make_strategy("seer")
    params = registry.get("seer").Params(top_k=1000, gates="identity", block_size=16)
    kv = make_kv()
    rows = step_rows([params], [1], [200], block_table([200]))
    query = random_query(1, 3)
    for out in run_step(strategy, rows, query, kv):
        torch.testing.assert_close(out, attention_reference(query, kv, rows), **TOL[torch.float32])


def test_sink_attends_exactly_sinks_and_window():
    strategy = make_strategy("sink")
    params = registry.get("sink").Params(n_sink=5, window=23)
    kv = make_kv(dtype=torch.bfloat16)
    seq_lens = [100, 200]
    rows = step_rows([params] * 2, [60, 1], seq_lens, block_table(seq_lens))
    query = random_query(61, 4, torch.bfloat16)
    visible = lambda b, q_pos, hk: (torch.arange(seq_lens[b]) < 5) | (q_pos - torch.arange(seq_lens[b]) < 23)
    expected = attention_reference(query, kv, rows, visible)
    for out in run_step(strategy, rows, query, kv):
        torch.testing.assert_close(out.float(), expected, **TOL[torch.bfloat16])
    # decode: 5 sinks + 23 window tokens; prefill: the visible (query, key) pairs
    assert strategy.stats("req-1").attended == pytest.approx(28)
    pairs = sum(int(visible(0, q, 0)[:q + 1].sum()) for q in range(40, 100))
    assert strategy.stats("req-0").attended == pytest.approx(pairs)


def recycled_steps(strategy, params, kv, table, prompt, steps, query_for_step):
    """Decode `steps` steps of one request; returns per step (out of layer 0, expected from the state)."""
    results = []
    for step in range(steps):
        seq = prompt + 1 + step
        rows = step_rows([params], [1], [seq], table)
        query = query_for_step(step)
        outs = run_step(strategy, rows, query, kv, layers=range(1))
        results.append((seq, query, outs[0]))
    return results


def test_recycled_full_step_every_stride_and_sparse_between():
    strategy = make_strategy("recycled")
    params = registry.get("recycled").Params(k=24, stride=4, refresh_threshold=None)
    kv = make_kv()
    table = block_table([200])
    full_steps, sparse_checked = [], 0
    for step in range(9):
        seq = 150 + step
        rows = step_rows([params], [1], [seq], table)
        query = random_query(1, 20 + step)
        before = strategy.state("req-0").full_steps if strategy.state("req-0") else 0
        state = strategy.state("req-0")
        if state is not None and state.step != 0:   # a sparse step: selection + new tokens
            chosen = {hk: set(state.sel_idx[0][hk].tolist()) | set(range(state.full_len[0], seq))
                      for hk in range(MODEL.num_kv_heads)}
            visible = lambda b, q_pos, hk: torch.tensor([t in chosen[hk] for t in range(seq)])
            expected = attention_reference(query, kv, rows, visible)
            sparse_checked += 1
        else:
            expected = attention_reference(query, kv, rows)
        out = run_step(strategy, rows, query, kv, layers=range(1))[0]
        torch.testing.assert_close(out, expected, **TOL[torch.float32])
        if strategy.state("req-0").full_steps > before:
            full_steps.append(step)
        assert strategy.state("req-0").sel_idx[0].shape == (MODEL.num_kv_heads, 24)
    assert full_steps == [0, 4, 8]
    assert sparse_checked == 6
    assert strategy.state("req-0").refreshes == 0


def test_recycled_selection_is_top_mass():
    """On a full step the kept tokens are those of largest attention mass (summed over the group)."""
    strategy = make_strategy("recycled")
    params = registry.get("recycled").Params(k=10, stride=8, refresh_threshold=None)
    kv = make_kv()
    table = block_table([100])
    rows = step_rows([params], [1], [100], table)
    query = random_query(1, 5)
    run_step(strategy, rows, query, kv, layers=range(1))
    k = logical_kv(kv.key_cache, table[0], 100)
    for hk in range(MODEL.num_kv_heads):
        heads = range(hk * MODEL.group_size, (hk + 1) * MODEL.group_size)
        mass = sum(torch.softmax(k[:, hk] @ query[0, h] / math.sqrt(MODEL.head_size), 0) for h in heads)
        expected = sorted(torch.topk(mass, 10).indices.tolist())
        assert strategy.state("req-0").sel_idx[0][hk].tolist() == expected


def test_recycled_follow_keeps_the_tokens_after_the_heaviest():
    """follow=f: the k // (f + 1) heaviest tokens and the f tokens after each are kept, the rest of k by
    mass; the step's output is attention over exactly that selection."""
    k, follow, seq = 12, 3, 100
    strategy = make_strategy("recycled")
    params = registry.get("recycled").Params(k=k, stride=8, follow=follow, refresh_threshold=None)
    kv = make_kv()
    table = block_table([seq + 8])
    rows = step_rows([params], [1], [seq], table)
    query = random_query(1, 5)
    run_step(strategy, rows, query, kv, layers=range(1))
    keys = logical_kv(kv.key_cache, table[0], seq)
    for hk in range(MODEL.num_kv_heads):
        heads = range(hk * MODEL.group_size, (hk + 1) * MODEL.group_size)
        mass = sum(torch.softmax(keys[:, hk] @ query[0, h] / math.sqrt(MODEL.head_size), 0) for h in heads)
        anchors = torch.topk(mass, k // (follow + 1)).indices.tolist()
        followed = {min(a + i, seq - 1) for a in anchors for i in range(follow + 1)}
        kept = strategy.state("req-0").sel_idx[0][hk].tolist()
        assert followed <= set(kept) and len(kept) == k == len(set(kept)) and kept == sorted(kept)
        rest = sorted(set(range(seq)) - followed, key=lambda t: -mass[t].item())[:k - len(followed)]
        assert set(kept) - followed == set(rest)
    rows_after = step_rows([params], [1], [seq + 1], table)                   # a sparse step
    state = strategy.state("req-0")
    chosen = {hk: set(state.sel_idx[0][hk].tolist()) | set(range(state.full_len[0], seq + 1))
              for hk in range(MODEL.num_kv_heads)}
    query = random_query(1, 6)
    expected = attention_reference(query, kv, rows_after,
                                   lambda b, q_pos, hk: torch.tensor([t in chosen[hk] for t in range(seq + 1)]))
    torch.testing.assert_close(run_step(strategy, rows_after, query, kv, layers=range(1))[0], expected,
                               **TOL[torch.float32])


def test_recycled_refreshes_when_query_drifts():
    params = registry.get("recycled").Params(k=16, stride=100, refresh_threshold=0.8)
    kv = make_kv()
    table = block_table([200])
    same = random_query(1, 7)
    steady = make_strategy("recycled")
    for step in range(4):
        run_step(steady, step_rows([params], [1], [150 + step], table), same, kv)
    assert steady.state("req-0").refreshes == 0
    drifting = make_strategy("recycled")
    for step in range(4):   # independent random queries: cosine ~ 0 < 0.8 on every layer
        run_step(drifting, step_rows([params], [1], [150 + step], table), random_query(1, 30 + step), kv)
    assert drifting.state("req-0").refreshes == 3 * MODEL.num_layers
    assert drifting.state("req-0").full_steps == 1
    assert drifting.stats("req-0").attended == pytest.approx(steady.stats("req-0").total)
    assert steady.stats("req-0").attended < steady.stats("req-0").total


def test_landmark_picks_the_chunk_of_a_planted_key():
    strategy = make_strategy("landmark")
    params = registry.get("landmark").Params(block_size=16, k_blocks=1, dense_layers=1)
    kv = make_kv()
    seq = 256
    table = block_table([seq])
    query = random_query(1, 9)
    planted = 117                                   # chunk 7: neither the first nor the newest
    for hk in range(MODEL.num_kv_heads):
        direction = query[0, hk * MODEL.group_size:(hk + 1) * MODEL.group_size].sum(0)
        kv.key_cache[table[0, planted // PAGE].long(), hk, planted % PAGE] = 30 * direction / direction.norm()
    rows = step_rows([params], [1], [seq], table)
    plan = strategy.plan(rows)
    idx, num = strategy.select(1, query, kv.key_cache, plan.decode[0])
    for hk in range(MODEL.num_kv_heads):
        chosen = sorted(idx[0, hk, :num[0, hk]].tolist())
        assert chosen == list(range(16)) + list(range(112, 128)) + list(range(240, 256))
    outs = [torch.empty_like(query) for _ in range(2)]
    for layer in range(2):
        strategy.run(layer, query, kv.key_cache, kv.value_cache, plan, outs[layer])
    strategy.finish_step(plan)
    torch.testing.assert_close(outs[0], attention_reference(query, kv, rows), **TOL[torch.float32])
    keep = lambda b, q_pos, hk: (torch.arange(seq) < 16) | ((torch.arange(seq) // 16) == 7) | (torch.arange(seq) >= 240)
    torch.testing.assert_close(outs[1], attention_reference(query, kv, rows, keep), **TOL[torch.float32])
    assert strategy.summarised["req-0"] == seq
    strategy.release("req-0")
    assert "req-0" not in strategy.summarised


def test_seer_identity_gate_matches_its_reference_selection():
    strategy = make_strategy("seer")
    params = registry.get("seer").Params(block_size=16, threshold=0.07, gates="identity")
    kv = make_kv()
    seq = 230
    table = block_table([seq])
    query = random_query(1, 11) * 4
    rows = step_rows([params], [1], [seq], table)
    plan = strategy.plan(rows)
    idx, num, probs = strategy.select(0, query, kv.key_cache, plan.decode[0])
    keys = logical_kv(kv.key_cache, table[0], seq)                    # [seq, Hkv, D]
    n_blocks = -(-seq // 16)
    for hk in range(MODEL.num_kv_heads):
        q = query[0, hk * MODEL.group_size:(hk + 1) * MODEL.group_size].mean(0)
        means = torch.stack([keys[b * 16:(b + 1) * 16, hk].mean(0) for b in range(n_blocks)])
        p = torch.softmax(means @ q / math.sqrt(MODEL.head_size), 0)
        torch.testing.assert_close(probs[0, hk, :n_blocks], p, atol=1e-5, rtol=1e-4)
        blocks = set((p >= 0.07).nonzero().view(-1).tolist()) | {n_blocks - 1}
        expected = [t for t in range(seq) if t // 16 in blocks]
        assert idx[0, hk, :num[0, hk]].tolist() == expected
        assert 0 < len(expected) < seq          # the threshold actually drops blocks here
    out = torch.empty_like(query)
    strategy.run(0, query, kv.key_cache, kv.value_cache, plan, out)
    strategy.finish_step(plan)
    chosen = {hk: set(idx[0, hk, :num[0, hk]].tolist()) for hk in range(MODEL.num_kv_heads)}
    keep = lambda b, q_pos, hk: torch.tensor([t in chosen[hk] for t in range(seq)])
    torch.testing.assert_close(out, attention_reference(query, kv, rows, keep), **TOL[torch.float32])


def test_seer_prefill_mask_is_block_causal_with_diagonal():
    strategy = make_strategy("seer")
    params = registry.get("seer").Params(block_size=16, threshold=0.2, gates="identity")
    kv = make_kv()
    rows = step_rows([params], [100], [100], block_table([100]))
    query = random_query(100, 12) * 4
    plan = strategy.plan(rows)
    mask = strategy.prefill_mask(0, query, kv.key_cache, plan.prefill[0])
    nb = 7
    assert mask.shape == (1, MODEL.num_kv_heads, nb, nb)
    assert not torch.triu(mask[0].int(), diagonal=1).any()              # causal at block level
    assert mask[0].diagonal(dim1=1, dim2=2).all()                       # the diagonal always kept
    assert (~mask[0].tril()).any()                                      # something was dropped
    out = torch.empty_like(query)
    strategy.run(0, query, kv.key_cache, kv.value_cache, plan, out)
    keep = lambda b, q_pos, hk: mask[0, hk, q_pos // 16][torch.arange(100) // 16]
    torch.testing.assert_close(out, attention_reference(query, kv, rows, keep), **TOL[torch.float32])


def test_seer_gates_save_load_and_errors(gates_dir, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_ALLOW_GATE_PATHS", str(gates_dir.resolve().parent))   # gate files by path
    gates = SeerGates.identity(MODEL, 32)
    path = gates_dir / "custom.safetensors"
    gates.save(path)
    loaded = SeerGates.load(path)
    assert loaded.problems(MODEL, 32) == []
    assert loaded.block_size == 32 and loaded.model_id == MODEL.model_id
    torch.testing.assert_close(loaded.decode_q, gates.decode_q)
    Seer = registry.get("seer")
    Seer.validate_for_model(Seer.Params(block_size=32, gates=str(path)), MODEL)
    with pytest.raises(ParamError) as info:       # wrong block size for these gates
        Seer.validate_for_model(Seer.Params(block_size=64, gates=str(path)), MODEL)
    assert info.value.field == "gates" and "block_size" in info.value.message
    with pytest.raises(ParamError) as info:       # no default gates for the model
        Seer.validate_for_model(Seer.Params(), MODEL)
    assert info.value.field == "gates" and "calibrate" in info.value.message and "identity" in info.value.message
    other = SeerGates.identity(MODEL.__class__(**{**MODEL.__dict__, "model_id": "other-model"}), 32)
    other.save(gates_dir / "other.safetensors")
    with pytest.raises(ParamError) as info:       # gates of another model
        Seer.validate_for_model(Seer.Params(block_size=32, gates=str(gates_dir / "other.safetensors")), MODEL)
    assert "other-model" in info.value.message
    big_page = MODEL.__class__(**{**MODEL.__dict__, "kv_block_size": 32})
    with pytest.raises(ParamError) as info:
        Seer.validate_for_model(Seer.Params(block_size=64, gates="identity"), big_page)
    assert info.value.field == "block_size" and "32" in info.value.message


def test_release_drops_all_state(gates_dir):
    kv = make_kv()
    seq_lens = [90, 140]
    table = block_table(seq_lens)
    for name in registry.names():
        strategy = make_strategy(name)
        params = registry.get(name).Params.from_dict({"gates": "identity"} if name == "seer" else {})
        run_step(strategy, step_rows([params] * 2, [90, 1], seq_lens, table), random_query(91, 13), kv)
        run_step(strategy, step_rows([params] * 2, [1, 1], [91, 141], table), random_query(2, 14), kv)
        held = strategy.held_bytes()
        for rid in ("req-0", "req-1"):
            strategy.release(rid)
        assert_no_request_state(strategy, ["req-0", "req-1"])
        # the worker idle: the buffers that scale with requests or the KV cache are gone
        strategy.free_idle()
        assert strategy.held_bytes() == 0, (name, held)
        if name in ("recycled", "landmark", "seer"):
            assert held > 0, name


def test_embedded_model_shapes_one_step(gates_dir):
    """The served model's facts (30 layers, 9 q / 3 kv heads, head 64, vLLM CPU page 128), bf16 cache:
    a decode step of every strategy at default params (seer: identity gates) is finite and touches
    fewer tokens than dense where the budget is below the context."""
    from server.model import embedded_model_dir
    from strategies.base import ModelFacts, StepRows
    model_dir = embedded_model_dir()
    if (model_dir / "config.json").is_file():
        model = ModelFacts.from_model_dir(model_dir)
    else:   # the same facts, written out (the model folder is made by `make model`)
        model = ModelFacts(30, 9, 3, 64, 128, 8192, torch.bfloat16, "SmolLM2-135M-Instruct")
    assert (model.num_layers, model.num_q_heads, model.num_kv_heads, model.head_size) == (30, 9, 3, 64)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(24, 3, 128, 128, generator=g).to(torch.bfloat16)
    key_cache, value_cache = kv.view(24, 3, 256, 64).chunk(2, dim=2)
    seq = 2500
    table = torch.randperm(24, generator=g)[:20].to(torch.int32)[None]
    query = torch.randn(1, 9, 64, generator=g).to(torch.bfloat16)
    for name in registry.names():
        cls = registry.get(name)
        strategy = cls(model)
        params = cls.Params.from_dict({"gates": "identity"} if name == "seer" else {})
        rows = StepRows.build(["r"], [params], [1], [seq], table)
        plan = strategy.plan(rows)
        for layer in range(model.num_layers):
            out = torch.empty_like(query)
            strategy.run(layer, query, key_cache, value_cache, plan, out)
            assert torch.isfinite(out.float()).all()
        strategy.finish_step(plan)
        fraction = strategy.stats("r").attended_fraction
        if name in ("full", "recycled"):        # recycled's first decode step is a full step
            assert fraction == pytest.approx(1.0)
        elif name == "sink":
            assert fraction == pytest.approx(1024 / seq)
        elif name == "landmark":                # 2 dense layers + 28 x (first + 64 chunks of 16 + newest: 4 tokens)
            assert fraction == pytest.approx((2 * seq + 28 * (65 * 16 + seq % 16)) / (30 * seq))
        else:
            assert 0 < fraction <= 1
        strategy.release("r")


def test_seer_incremental_gate_keys_equal_recomputed_from_scratch(tmp_path, monkeypatch):
    """The decode gate keys are projected once per block and kept per physical page; at every step the
    gate probabilities equal those of a fresh strategy that projects every block now (random gates with
    gate RoPE, so a stale or misplaced block would show)."""
    from dataclasses import replace
    g = torch.Generator().manual_seed(3)
    identity = SeerGates.identity(MODEL, 16)
    shape_q, shape_k = identity.decode_q.shape, identity.decode_k.shape
    gates = replace(identity, gate_dim=identity.gate_dim, rope_theta=10000.0,
                    decode_q=torch.randn(shape_q, generator=g) / 8, decode_k=torch.randn(shape_k, generator=g) / 8)
    path = tmp_path / "random.safetensors"
    gates.save(path)
    monkeypatch.setenv("ATTNSERVE_ALLOW_GATE_PATHS", str(tmp_path.resolve()))   # a gate file by path
    params = registry.get("seer").Params(block_size=16, top_k=4, gates=str(path))
    kv = make_kv()
    table = block_table([200])
    incremental = make_strategy("seer")
    compared = 0
    for step in range(20):     # crosses block boundaries (seq 150..169, blocks of 16)
        seq = 150 + step
        query = random_query(1, 40 + step)
        rows = step_rows([params], [1], [seq], table)
        plan = incremental.plan(rows)
        fresh = make_strategy("seer")
        fresh_plan = fresh.plan(rows)
        for layer in (0, MODEL.num_layers - 1):
            _, _, probs = incremental.select(layer, query, kv.key_cache, plan.decode[0])
            _, _, expected = fresh.select(layer, query, kv.key_cache, fresh_plan.decode[0])
            torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
            compared += 1
        incremental.finish_step(plan)
    assert incremental.projected_upto["req-0"] == 169 and compared == 40
    incremental.release("req-0")
    assert "req-0" not in incremental.projected_upto
