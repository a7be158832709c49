"""The router's view of a parallel engine and of the machine, built from vLLM's own configs (no engine):
pipeline stages, tensor-parallel head shards, CPU attention ISAs whose cache the strategies cannot
read, and steps whose rows cannot be identified. The engines themselves: tests/e2e/test_parallel.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from strategies.engine.backend import Router, readable_cpu_attention_isa
from strategies.base import ModelFacts
from strategies.registry import AttentionChoice
from strategies.seer import SeerGates, SeerStrategy


@pytest.fixture(scope="module")
def model_config(embedded_model_dir):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(embedded_model_dir), max_model_len=2048)


def attached_router(model_config, **parallel) -> Router:
    from vllm.config import ParallelConfig

    router = Router()
    router.attach(SimpleNamespace(model_config=model_config, parallel_config=ParallelConfig(**parallel)),
                  block_size=128)
    return router


def test_each_pipeline_stage_finishes_its_step_after_its_own_last_layer(model_config):
    first = attached_router(model_config, pipeline_parallel_size=2, rank=0)
    second = attached_router(model_config, pipeline_parallel_size=2, rank=1)
    assert first.model.layers == (0, 15) and second.model.layers == (15, 30)
    assert first.model.num_layers == second.model.num_layers == 30     # layer indices stay global
    assert [i for i in range(30) if first.is_last_layer(i)] == [14]
    assert [i for i in range(30) if second.is_last_layer(i)] == [29]
    assert second.model.local_layers == 15


def test_a_stage_counts_means_over_its_own_layers(model_config):
    from strategies.full import FullStrategy
    from strategies.base import StepRows

    model = attached_router(model_config, pipeline_parallel_size=2, rank=1).model
    strategy = FullStrategy(model)
    rows = StepRows.build(["r"], [FullStrategy.Params()], [1], [100], torch.zeros(1, 4, dtype=torch.int32))
    plan = strategy.plan(rows)
    strategy.finish_step(plan)
    usage = strategy.stats("r")
    assert usage.attended == usage.total == usage.decode_total == 100


def test_tensor_parallel_ranks_hold_their_share_of_heads(model_config):
    ranks = [attached_router(model_config, tensor_parallel_size=3, rank=r).model for r in range(3)]
    assert [(m.tp_rank, m.num_q_heads, m.num_kv_heads) for m in ranks] == [(0, 3, 1), (1, 3, 1), (2, 3, 1)]
    assert all(m.whole_model().num_kv_heads == 3 and m.whole_model().num_q_heads == 9 for m in ranks)


def test_seer_gates_of_a_rank_are_its_kv_heads_slice(model_config):
    ranks = [attached_router(model_config, tensor_parallel_size=3, rank=r).model for r in range(3)]
    whole = SeerGates.load(_shipped_gates()[0])
    for model in ranks:
        SeerStrategy.validate_for_model(SeerStrategy.Params(), model)    # the whole-model file fits every rank
        gates = whole.for_rank(model)
        assert gates.num_kv_heads == 1 and gates.num_q_heads == 3
        for name in SeerGates._TENSORS:
            torch.testing.assert_close(getattr(gates, name), getattr(whole, name)[:, model.tp_rank:model.tp_rank + 1],
                                       rtol=0, atol=0)


def _shipped_gates():
    from strategies.seer import SHIPPED_GATES_DIR

    return sorted(SHIPPED_GATES_DIR.glob("*/seer.safetensors"))


@pytest.mark.parametrize("vllm_isa, x86, expected", [
    ("vec", True, "vec"), ("vec16", True, "vec16"), ("amx", True, "vec"), ("neon", False, None),
    ("rvv", False, None), ("vec", False, "vec"),
])
def test_cpu_attention_isa_the_strategies_can_read(vllm_isa, x86, expected):
    assert readable_cpu_attention_isa(vllm_isa, x86) == expected


def fake_runner(request_ids: list[str], batch_rows: int, choices: dict[str, dict]) -> SimpleNamespace:
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"attention": choices[rid]}),
                                     num_prompt_tokens=100)
                for rid in request_ids}
    return SimpleNamespace(requests=requests,
                           input_batch=SimpleNamespace(num_reqs=batch_rows, req_ids=list(request_ids)))


def test_an_unavailable_machine_runs_full_and_says_why(caplog):
    router = Router()
    router.model = ModelFacts(30, 9, 3, 64, 32, 2048, torch.bfloat16, "SmolLM2-135M-Instruct")
    router.unavailable = "vLLM's CPU attention on this machine ('neon') keeps the KV cache elsewhere"
    router.runner = fake_runner(["a", "b"], 2, {"a": {"strategy": "sink"}, "b": {"strategy": "full"}})
    with caplog.at_level(logging.WARNING, logger="strategies.engine.backend"):
        assert router.choice("a") == AttentionChoice.default()
        assert router.choice("b").strategy == "full"
    assert "'sink'" in caplog.text and "neon" in caplog.text


def test_a_step_whose_rows_cannot_be_identified_is_logged(caplog):
    router = Router()
    router.model = ModelFacts(30, 9, 3, 64, 32, 2048, torch.bfloat16, "SmolLM2-135M-Instruct")
    choices = {"a": {"strategy": "sink"}, "b": {"strategy": "landmark"}}
    router.runner = fake_runner(["a", "b"], 2, choices)
    for rid in choices:
        router.choice(rid)
    with caplog.at_level(logging.ERROR, logger="strategies.engine.backend"):
        assert router.step_request_ids(2) == ["a", "b"]
        assert caplog.text == ""
        router.runner.input_batch.num_reqs = 3             # the step's metadata and the batch disagree
        assert router.step_request_ids(2) is None
    assert "every row runs full attention" in caplog.text
    assert "landmark, sink" in caplog.text and "released by sink" in caplog.text


def test_a_warm_up_step_is_not_logged(caplog):
    router = Router()
    router.runner = fake_runner([], 0, {})
    with caplog.at_level(logging.ERROR, logger="strategies.engine.backend"):
        assert router.step_request_ids(4) is None
    assert caplog.text == ""


def test_gemma3s_windowed_layers_and_scale_without_an_engine(gemma_model_dir):
    """Gemma 3 270M's config (no layers built: the config fallback of attention_layer_facts): 15 of 18
    layers have a window of 512 and run vLLM's kernel; the step finishes after layer 17."""
    from vllm.config import ModelConfig

    router = attached_router(ModelConfig(model=str(gemma_model_dir), max_model_len=2048))
    model = router.model
    assert model.window_layers == tuple(i for i in range(18) if i % 6 != 5) and model.sliding_window == 512
    assert model.attention_scale == pytest.approx(256 ** -0.5) and model.routed_layers == 3
    assert [i for i in range(18) if router.is_last_layer(i)] == [17]
    assert model.dense_step_attended(1, 2000) == pytest.approx((15 * 512 + 3 * 2000) / 18)
