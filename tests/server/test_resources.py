"""server/resources.py: the reservation of the strategies' buffers per engine request, against the bound."""

import asyncio

import pytest
import torch
from vllm.exceptions import GracefulHTTPError, VLLMValidationError

from server.resources import StateLedger, request_state_bytes
from strategies import registry
from strategies.base import ModelFacts

MODEL = ModelFacts(num_layers=30, num_q_heads=9, num_kv_heads=3, head_size=64, kv_block_size=128,
                   max_model_len=2048, dtype=torch.bfloat16, model_id="SmolLM2-135M-Instruct")
Recycled = registry.get("recycled")


def test_request_bytes_follow_the_strategy_prompt_max_tokens_and_n():
    extra = {"attention": {"strategy": "recycled", "params": {"k": 0.25, "stride": 16}}}
    strategy, nbytes, field = request_state_bytes(extra, 1000, 200, 2, MODEL)
    k = 300     # 0.25 of the longest context, 1,200 tokens
    assert (strategy, field) == ("recycled", "attention.params.k")
    assert nbytes == 2 * -(-(k + 17) // 64) * Recycled.pool_page_bytes(MODEL)
    # the longest context is at most the model's length
    _, capped, _ = request_state_bytes(extra, 1000, 10_000, 1, MODEL)
    assert capped == -(-(512 + 17) // 64) * Recycled.pool_page_bytes(MODEL)
    # a budget names its own field; strategies without buffers reserve nothing
    _, _, field = request_state_bytes({"attention": {"strategy": "recycled", "params": {}, "budget": 0.25}},
                                      1000, 10, 1, MODEL)
    assert field == "attention.budget"
    for name in ("full", "sink", "landmark", "seer"):
        assert request_state_bytes({"attention": {"strategy": name, "params": {}}}, 1000, 10, 1, MODEL)[1] == 0
    assert request_state_bytes(None, 1000, 10, 1, MODEL)[:2] == ("full", 0)


def test_ledger_waits_for_room_then_admits():
    async def scenario():
        ledger = StateLedger(limit=100, wait_s=5.0)
        order = []

        async def request(name, nbytes, hold_s):
            async with ledger.hold("recycled", nbytes, "attention.params.k"):
                order.append((name, ledger.total))
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(request("a", 60, 0.3))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(request("b", 60, 0.0))    # waits until "a" gives its 60 back
        await asyncio.gather(first, second)
        return order, ledger.total, ledger.reserved

    order, total, reserved = asyncio.run(scenario())
    assert order == [("a", 60), ("b", 60)]
    assert total == 0 and reserved == {"recycled": 0}


def test_ledger_gives_429_after_the_wait_and_400_when_a_request_can_never_fit():
    async def scenario():
        ledger = StateLedger(limit=100, wait_s=0.1)
        async with ledger.hold("recycled", 80, "attention.params.k"):
            with pytest.raises(GracefulHTTPError) as busy:
                async with ledger.hold("recycled", 30, "attention.params.k"):
                    pass
            async with ledger.hold("recycled", 20, "attention.params.k"):    # fits beside the 80
                assert ledger.total == 100
        with pytest.raises(VLLMValidationError) as never:
            async with ledger.hold("recycled", 101, "attention.budget"):
                pass
        return busy.value, never.value, ledger.total

    busy, never, total = asyncio.run(scenario())
    assert busy.http_status == 429 and "--strategy-memory-gib" in str(busy)
    assert never.parameter == "attention.budget" and "--strategy-memory-gib" in str(never)
    assert total == 0


def test_unbounded_ledger_and_zero_byte_requests_never_wait():
    async def scenario():
        ledger = StateLedger(limit=None)
        async with ledger.hold("recycled", 10 ** 15, "attention.params.k"):
            bounded = StateLedger(limit=1, wait_s=0.0)
            async with bounded.hold("recycled", 1, "attention.params.k"):
                async with bounded.hold("full", 0, "attention.params"):
                    return ledger.total

    assert asyncio.run(scenario()) == 10 ** 15
