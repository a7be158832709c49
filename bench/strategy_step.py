"""Attention cost of one decode step per strategy, in-process (no engine): `python -m bench.strategy_step`.

The engine step of the embedded model is ~30 ms of model plus the attention of 30 layers; this times
only the attention part exactly as the router runs it (``Strategy.plan`` once, ``run`` per layer,
``finish_step``) on a synthetic bf16 KV cache in vLLM's CPU layout, for ``--batch`` rows of
``--context`` tokens each, over ``--steps`` consecutive decode steps, the strategies interleaved step by step (the first step, which
summarises / pools the whole prompt, is excluded; recycled's full step every ``stride`` is included).
``full`` here is vLLM's own CPU kernel, as the router calls it for ``full`` rows. ``--budget`` is the
request's ``attention.budget`` (the share of the context a decode step attends, every part counted), mapped
by each strategy's ``params_for_budget`` as the server does (before 2026-12-07: each strategy's own budget
param set to it, which attends more). Prints per-step ms,
per layer ms and the speedup vs ``full`` side by side; no assertion.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.kernels import D, DTYPE, HKV, HQ, PAGE, vllm_decode
from strategies import ops
from strategies.base import ModelFacts, StepRows
from server.model import embedded_model_dir
from strategies.registry import FULL, names, parse_attention
from strategies.registry import get as get_strategy

MODEL_DIR = embedded_model_dir()
LAYERS = 30


def model_facts() -> ModelFacts:
    if (MODEL_DIR / "config.json").exists():
        return ModelFacts.from_model_dir(MODEL_DIR, kv_block_size=PAGE)
    return ModelFacts(num_layers=LAYERS, num_q_heads=HQ, num_kv_heads=HKV, head_size=D, kv_block_size=PAGE,
                      max_model_len=8192, dtype=DTYPE, model_id="SmolLM2-135M-Instruct")


def make_caches(batch: int, context: int, steps: int, layers: int, generator: torch.Generator):
    blocks_per_seq = -(-(context + steps + 1) // PAGE)
    num_blocks = batch * blocks_per_seq
    table = torch.randperm(num_blocks, generator=generator).to(torch.int32).view(batch, -1)
    caches = []
    for _ in range(layers):
        kv = torch.randn(num_blocks, HKV, PAGE, 2 * D, generator=generator).to(DTYPE)
        halves = kv.view(num_blocks, HKV, 2, PAGE * D)
        key_cache = halves[:, :, 0].view(num_blocks, HKV, D, PAGE).transpose(2, 3)
        value_cache = halves[:, :, 1].view(num_blocks, HKV, PAGE, D)
        caches.append((kv, key_cache, value_cache))
    return caches, table


def strategy_params(name: str, budget: float, context: int, fixed: dict) -> dict:
    """The params a request with ``attention.budget`` = ``budget`` and ``fixed`` params runs with at
    ``context`` tokens (the server's own mapping, ``Strategy.params_for_budget``)."""
    attention = {"strategy": name, "params": fixed}
    if get_strategy(name).budget_param is not None:
        attention["budget"] = budget
    return parse_attention(attention).for_context(context, model_facts()).params.to_dict()


def step_runner(name: str, params: dict, caches, table, batch: int, context: int, steps: int,
                generator: torch.Generator, grain: int | None = None):
    """Yields the seconds of each decode step 0..steps (step 0 warms the strategy's state); with
    `grain`, our CPU ops run at that parallel grain during this runner's steps."""
    model = model_facts()
    query = torch.randn(batch, HQ, D, generator=generator).to(DTYPE)
    out = torch.empty_like(query)
    scale = D ** -0.5
    if name == FULL:
        for step in range(steps + 1):
            seq_lens = torch.full((batch,), context + step, dtype=torch.int32)
            started = time.perf_counter()
            for kv, _, _ in caches:
                run, _ = vllm_decode(kv, query, table, seq_lens, scale)
                run()
            yield time.perf_counter() - started
        return
    strategy = get_strategy(name)(model)
    validated = strategy.Params.from_dict(params)
    ids = [f"r{i}" for i in range(batch)]
    for step in range(steps + 1):
        if grain is not None:
            ops.set_parallel_grain(grain)
        started = time.perf_counter()
        rows = StepRows.build(ids, [validated] * batch, [1] * batch, [context + step] * batch, table)
        plan = strategy.plan(rows)
        for layer, (_, key_cache, value_cache) in enumerate(caches):
            strategy.run(layer, query, key_cache, value_cache, plan, out)
        strategy.finish_step(plan)
        yield time.perf_counter() - started
    for rid in ids:
        strategy.release(rid)


def time_interleaved(runners: dict) -> dict[str, float]:
    """Mean seconds per step over steps 1.., the strategies' steps interleaved (step s of each, then
    s + 1): a shared, noisy machine disturbs every strategy alike."""
    totals = {name: [] for name in runners}
    live = dict(runners)
    while live:
        for name in list(live):
            try:
                totals[name].append(next(live[name]))
            except StopIteration:
                del live[name]
    return {name: sum(times[1:]) / max(len(times) - 1, 1) for name, times in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    parser.add_argument("--param", action="append", default=[], metavar="STRATEGY.NAME=JSON",
                        help="override a param, e.g. landmark.dense_layers=0")
    parser.add_argument("--grains", type=int, nargs="+", default=None, metavar="N",
                        help="run each sparse strategy once per CPU parallel grain (work units below "
                             "which our ops use one thread), interleaved, e.g. --grains 16777216 1048576")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert ops.has_compiled("sparse_paged_attention", "cpu"), ops.EXTENSION_ERROR
    import json
    generator = torch.Generator().manual_seed(0)
    caches, table = make_caches(args.batch, args.context, args.steps, args.layers, generator)
    overrides: dict[str, dict] = {}
    for item in args.param:
        key, value = item.split("=", 1)
        strat, pname = key.split(".", 1)
        overrides.setdefault(strat, {})[pname] = json.loads(value)
    args.strategies = args.strategies or names()
    params_of = {name: strategy_params(name, args.budget, args.context, overrides.get(name, {}))
                 for name in args.strategies}
    default_grain = ops.set_parallel_grain(-1)
    grains = args.grains or [None]
    runners, params_of_label = {}, {}
    for name in args.strategies:
        for grain in ([None] if name == FULL else grains):
            label = name if grain is None else f"{name}@grain={grain}"
            params_of_label[label] = params_of[name]
            runners[label] = step_runner(name, params_of[name], caches, table, args.batch, args.context,
                                         args.steps, generator, grain)
    results = {label: (params_of_label[label], seconds)
               for label, seconds in time_interleaved(runners).items()}
    base = results.get(FULL, (None, None))[1]
    print(f"\n{time.strftime('%Y-%m-%d')}: batch {args.batch}, context {args.context}, {args.layers} layers, "
          f"budget {args.budget}, {torch.get_num_threads()} threads, default parallel grain "
          f"{default_grain}; attention only (no model)")
    print("| strategy | params | ms/step | ms/layer | full / strategy |")
    print("|---|---|---|---|---|")
    for name, (params, seconds) in results.items():
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"| {name} | {json.dumps(params)} | {seconds * 1e3:.2f} | {seconds * 1e3 / args.layers:.3f} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
