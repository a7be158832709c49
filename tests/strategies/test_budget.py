"""``attention.budget``: one unit for every strategy. The request field is validated (the field named, what
is allowed said), each strategy turns it into its own params for the prompt's length, and the share a
decode step attends, as the kernels' indices count it, stays within the budget (+ 1/64)."""

import pytest
import torch

from strategies import registry
from strategies.base import ModelFacts, ParamError, StepRows
from strategies.registry import AttentionChoice, parse_attention, parse_vllm_xargs

# The embedded model's shapes on vLLM's CPU page; 30 layers.
MODEL = ModelFacts(30, 9, 3, 64, 128, 8192, torch.float32, "SmolLM2-135M-Instruct")
SPARSE = [n for n in registry.names() if registry.get(n).budget_param is not None]
CONTEXT = 2500
STEPS = 32          # two of recycled's cycles at its default stride


def test_every_strategy_but_full_takes_a_budget():
    assert set(SPARSE) == set(registry.names()) - {"full"}


@pytest.mark.parametrize("budget, message", [
    (1.5, "(0, 1]"), (0.0, "(0, 1]"), (0, ">= 1"), (-3, ">= 1"), ("a lot", "fraction"), (True, "fraction"),
    ([0.5], "fraction"),
])
def test_a_bad_budget_names_the_field(budget, message):
    with pytest.raises(ParamError) as error:
        parse_attention({"strategy": "landmark", "budget": budget})
    assert error.value.field == "attention.budget" and message in error.value.message


def test_full_takes_no_budget():
    with pytest.raises(ParamError, match="whole context") as error:
        parse_attention({"strategy": "full", "budget": 0.5})
    assert error.value.field == "attention.budget"


def test_budget_travels_to_the_workers_and_back():
    choice = parse_attention({"strategy": "seer", "budget": 0.125, "params": {"gates": "identity"}})
    assert choice.budget == 0.125
    assert AttentionChoice.from_extra_args({"attention": choice.to_extra_args()}) == choice
    assert parse_vllm_xargs({"attention_strategy": "sink", "attention_budget": 512}).budget == 512


def test_an_explicit_param_wins_over_the_budget():
    for name in SPARSE:
        param = registry.get(name).budget_param
        value = {"window": 100, "k": 100, "k_blocks": 10, "top_k": 4}[param]
        choice = parse_attention({"strategy": name, "budget": 0.25, "params": {param: value}})
        assert choice.budget is None and getattr(choice.params, param) == value
        assert choice.for_context(CONTEXT, MODEL) == choice


@pytest.mark.parametrize("name, params", [("recycled", {"stride": 16}), ("landmark", {"dense_layers": 2})])
def test_a_budget_below_the_fixed_parts_is_refused(name, params):
    choice = parse_attention({"strategy": name, "budget": 1 / 32, "params": params})
    with pytest.raises(ParamError) as error:
        registry.get(name).check_budget(choice.params, choice.budget, MODEL)
    assert error.value.field == "budget"
    registry.get(name).check_budget(choice.params, 0.25, MODEL)      # a budget above them is fine


def decode_share(name: str, choice: AttentionChoice, context: int) -> float:
    """Run STEPS decode steps of a ``context``-token prompt on random KV (every layer) and return the
    decode share the strategy counted from its kernels' indices."""
    generator = torch.Generator().manual_seed(0)
    pages = -(-(context + STEPS) // MODEL.kv_block_size)
    kv = torch.randn(pages + 2, MODEL.num_kv_heads, MODEL.kv_block_size, 2 * MODEL.head_size, generator=generator)
    key_cache, value_cache = kv.view(pages + 2, MODEL.num_kv_heads, 2 * MODEL.kv_block_size, -1).chunk(2, dim=2)
    table = torch.randperm(pages + 2, generator=generator)[:pages].to(torch.int32)[None]
    strategy = registry.get(name)(MODEL)
    params = choice.for_context(context, MODEL).params
    for step in range(STEPS):
        rows = StepRows.build(["r"], [params], [1], [context + 1 + step], table)
        plan = strategy.plan(rows)
        query = torch.randn(1, MODEL.num_q_heads, MODEL.head_size, generator=generator)
        for layer in range(MODEL.num_layers):
            strategy.run(layer, query, key_cache, value_cache, plan, torch.empty_like(query))
        strategy.finish_step(plan)
    return strategy.stats("r").decode_attended_fraction


@pytest.mark.parametrize("budget", [1 / 8, 1 / 4, 1 / 2, 400])
@pytest.mark.parametrize("name", SPARSE)
def test_the_decode_share_meets_the_budget(name, budget, gates_dir):
    params = {"gates": "identity"} if name == "seer" else {}
    choice = parse_attention({"strategy": name, "budget": budget, "params": params})
    share = decode_share(name, choice, CONTEXT)
    wanted = budget if isinstance(budget, float) else budget / CONTEXT
    assert share <= wanted + 1 / 64, (name, budget, share)
    assert share >= wanted - 1 / 16, (name, budget, share)     # block granularity and the context's growth
    # the share the eval and recommend report (counted from the params) is what the kernels attended
    nominal = registry.get(name).decode_share(choice.for_context(CONTEXT, MODEL).params, CONTEXT, MODEL)
    assert share == pytest.approx(nominal, abs=1 / 64), (name, budget, share, nominal)


# Gemma 3 270M's shapes: 18 layers, 5 of 6 with a 512-token window; seer's gates are shipped for it at 64 and
# at 32 tokens per block.
GEMMA = ModelFacts(18, 4, 1, 256, 128, 32768, torch.float32, "gemma-3-270m",
                   window_layers=tuple(i for i in range(18) if i % 6 != 5), sliding_window=512)


@pytest.mark.parametrize("context,block,top_k", [(2048, 32, 7), (3000, 32, 10), (4096, 64, 7), (8000, 64, 14)])
def test_seer_takes_finer_blocks_where_a_budget_leaves_few(context, block, top_k, monkeypatch, tmp_path):
    """At 1/8 of 2k tokens, 4 blocks of 64 (one the newest) lose pass keys that 8 blocks of 32 keep
    (docs/seer.md): below 8 blocks of 64 the budget takes the model's 32-token gates, and those fit it."""
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path))       # only the shipped gates
    seer = registry.get("seer")
    params = parse_attention({"strategy": "seer", "budget": 0.125}).for_context(context, GEMMA).params
    assert (params.block_size, params.top_k) == (block, top_k)
    seer.validate_for_model(params, GEMMA)                      # the gates at that block exist and fit
    assert seer.decode_share(params, context, GEMMA) <= 0.125 + 1 / 64


def test_seer_keeps_its_block_without_gates_at_32_or_with_named_gates(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path))
    smol = parse_attention({"strategy": "seer", "budget": 0.125}).for_context(2048, MODEL).params
    assert smol.block_size == 64                                # no 32-token gates shipped for SmolLM2
    named = parse_attention({"strategy": "seer", "budget": 0.125, "params": {"gates": "identity"}})
    assert named.for_context(2048, GEMMA).params.block_size == 64
    explicit = parse_attention({"strategy": "seer", "params": {"top_k": 3}})       # no budget: as given
    assert explicit.for_context(2048, GEMMA).params.block_size == 64
