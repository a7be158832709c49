"""What can be checked of the CUDA routing backend (strategies/engine/backend_cuda.py) without a GPU: the plugin
registers it by path without importing it, its class contract with vLLM, and its K/V views of vLLM's
FlashAttention cache layout (on CPU tensors, against a gather)."""

from __future__ import annotations

import sys

import pytest
import torch


def _register_on(monkeypatch, cpu: bool, cuda: bool) -> list:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import registry

    from strategies.engine import kv_release, plugin

    calls = []
    monkeypatch.setattr(current_platform, "is_cpu", lambda: cpu)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: cuda)
    monkeypatch.setattr(registry, "register_backend", lambda backend, path: calls.append((backend, path)))
    monkeypatch.setattr(kv_release, "install", lambda: None)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.delitem(sys.modules, "strategies.engine.backend_cuda", raising=False)
    plugin.register()
    assert "strategies.engine.backend_cuda" not in sys.modules   # vLLM imports it only when it selects CUSTOM
    return calls


def test_plugin_registers_the_cuda_backend_by_path(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert _register_on(monkeypatch, cpu=False, cuda=True) == [
        (AttentionBackendEnum.CUSTOM, "strategies.engine.backend_cuda.RoutingFlashBackend")]
    assert _register_on(monkeypatch, cpu=True, cuda=False) == [
        (AttentionBackendEnum.CPU_ATTN, "strategies.engine.backend.RoutingCPUBackend")]


def test_cuda_backend_class_contract():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from strategies.engine import backend, backend_cuda, plugin

    cls = backend_cuda.RoutingFlashBackend
    assert issubclass(cls, FlashAttentionBackend)
    assert cls.get_name() == "CUSTOM"
    assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CUSTOM   # Attention layer's lookup
    module, qualname = cls.full_cls_name()
    assert f"{module}.{qualname}" == plugin.CUDA_BACKEND
    builder, impl = cls.get_builder_cls(), cls.get_impl_cls()
    # the routing comes first in the MRO, vLLM's FlashAttention is what super() reaches
    assert builder.__mro__[1:3] == (backend.RoutingBuilderMixin, FlashAttentionMetadataBuilder)
    assert impl.__mro__[1:3] == (backend.RoutingImplMixin, FlashAttentionImpl)
    assert builder.build is backend.RoutingBuilderMixin.build
    assert impl.forward is backend.RoutingImplMixin.forward
    assert builder.get_cudagraph_support(None, None) is AttentionCGSupport.NEVER
    assert builder.supports_update_block_table is False
    # the CPU backend is the same routing over vLLM's CPU classes
    assert backend.RoutingCPUBackend.get_name() == "CPU_ATTN"
    assert backend.RoutingCPUMetadataBuilder.build is backend.RoutingBuilderMixin.build
    assert backend.RoutingCPUImpl.forward is backend.RoutingImplMixin.forward


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLNHC"])
def test_flash_cache_views_match_a_gather(layout):
    """vLLM writes token t of block b, head h into ``kv_cache.transpose(1, 2).split(D, -1)`` at [b, t, h]
    (``reshape_and_cache_flash``); the strategies' views must read the same values at [b, h, t]."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from strategies.engine.backend_cuda import flash_cache_views

    num_layers, num_blocks, hkv, block, d = 2, 5, 3, 16, 8
    order = KVCacheLayout[layout].stride_order          # logical [L, B, H, N, C] -> physical order
    physical_shape = [(num_layers, num_blocks, hkv, block, 2 * d)[i] for i in order]
    raw = torch.zeros(physical_shape)
    logical = raw.permute(*[order.index(i) for i in range(5)])   # back to [L, B, H, N, C]
    kv_cache = logical[1]                                          # one layer's [B, H, N, 2D] view
    assert kv_cache.shape == (num_blocks, hkv, block, 2 * d)

    keys = torch.randn(num_blocks, block, hkv, d)
    values = torch.randn(num_blocks, block, hkv, d)
    k_flash, v_flash = kv_cache.transpose(1, 2).split(d, dim=-1)    # FlashAttentionImpl's own views
    k_flash.copy_(keys)
    v_flash.copy_(values)

    key_cache, value_cache = flash_cache_views(kv_cache, d)
    assert key_cache.shape == value_cache.shape == (num_blocks, hkv, block, d)
    assert key_cache.stride(-1) == value_cache.stride(-1) == 1
    assert key_cache.data_ptr() == kv_cache.data_ptr()              # views, no copy
    assert logical[0].abs().sum() == 0                              # the other layer untouched

    block_table = torch.tensor([3, 0, 4])                            # a sequence of 3 pages
    positions = torch.arange(3 * block)
    blocks, offsets = block_table[positions // block], positions % block
    torch.testing.assert_close(key_cache[blocks, :, offsets], keys[blocks, offsets], rtol=0, atol=0)
    torch.testing.assert_close(value_cache[blocks, :, offsets], values[blocks, offsets], rtol=0, atol=0)

    with pytest.raises(ValueError):
        flash_cache_views(kv_cache, d + 1)


def test_server_asks_vllm_for_the_custom_backend_on_cuda(monkeypatch):
    from vllm.platforms import current_platform

    from server import config

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    assert config.routing_backend_argv() == []
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    assert config.routing_backend_argv() == ["--attention-backend", "CUSTOM"]
    settings = config.ServeSettings(model="m", served_model_name="m",
                                    engine_args=(("attention-backend", "FLASH_ATTN"),))
    argv = settings.vllm_argv()
    assert "--enforce-eager" in argv
    assert argv.index("CUSTOM") < argv.index("FLASH_ATTN")   # an explicit engine arg still wins
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert config.routing_backend_argv() == []

    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionConfig.validate_backend_before("CUSTOM") is AttentionBackendEnum.CUSTOM
