"""The routing attention backend on CUDA: vLLM's FlashAttention with the routing of ``strategies.engine.backend``.

Registered by ``strategies.engine.plugin`` as ``AttentionBackendEnum.CUSTOM`` (only on CUDA: this module imports
vLLM's FlashAttention backend); the engine must be started with ``attention_backend="CUSTOM"`` (the
server adds ``--attention-backend CUSTOM`` on CUDA, ``server/config.py``). The routing is the CPU
backend's (``RoutingBuilderMixin``/``RoutingImplMixin`` and the process-wide ``ROUTER``):

- ``full`` rows (and prefill rows of ``dense_prefill`` strategies) run on FlashAttention's own kernel
  with ``FlashAttentionMetadata`` that ``FlashAttentionMetadataBuilder.build`` made for exactly those
  rows (query_start_loc, seq_lens, block_table, max_query_len, max_seq_len, the FA3 AOT
  ``scheduler_metadata``, causal, slot_mapping all of the sub-batch); a step whose rows are all dense
  is FlashAttention's own metadata and kernel call, unchanged (zero copies);
- every other strategy's rows go to ``strategy.run`` with the K/V views of ``strategy_cache_views``.

Eager only: the router plans on the host once per step and runs Python per layer, so the builder
reports ``AttentionCGSupport.NEVER`` (vLLM then captures no full CUDA graph) and the server starts
vLLM with ``--enforce-eager``. Not supported (raise at start-up or when a non-``full`` row needs it):
decode context parallelism, quantized (fp8) KV caches for the strategies. Where FlashAttention's kernel
block is smaller than the KV manager's, the builder's spec, block table and the layer's cache are all in
kernel blocks (vLLM maps them), so ``ModelFacts.kv_block_size`` is the kernel block size.
"""

from __future__ import annotations

from torch import Tensor

from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from strategies.engine.backend import RoutingBuilderMixin, RoutingImplMixin


def flash_cache_views(kv_cache: Tensor, head_size: int) -> tuple[Tensor, Tensor]:
    """vLLM 0.32's per-layer cache is the logical view ``[num_blocks, Hkv, block_size, 2*D]`` whose
    channel axis holds K then V (``FlashAttentionImpl.forward``: ``kv_cache.transpose(1, 2).split(D,
    dim=-1)``), in any of the ``KVCacheLayout`` stride orders (channel innermost in all of them).
    Returns K and V as ``[num_blocks, Hkv, block_size, D]`` views, head dim stride 1, no copy."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"expected a KV cache [num_blocks, num_kv_heads, block_size, {2 * head_size}], "
                         f"got {tuple(kv_cache.shape)}")
    key_cache, value_cache = kv_cache.split(head_size, dim=-1)
    return key_cache, value_cache


class RoutingFlashMetadataBuilder(RoutingBuilderMixin, FlashAttentionMetadataBuilder):
    # Our metadata is a RoutedMetadata, which FlashAttention's update_block_table (a copy with another
    # block table) cannot patch: every KV cache group builds its own.
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.dcp_world_size > 1:
            raise NotImplementedError("attnserve's routing backend does not support decode context "
                                      "parallelism (decode_context_parallel_size > 1)")

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.NEVER   # host-side routing per step and per layer: eager only


class RoutingFlashImpl(RoutingImplMixin, FlashAttentionImpl):
    def strategy_cache_views(self, kv_cache: Tensor, layer) -> tuple[Tensor, Tensor]:
        if is_quantized_kv_cache(self.kv_cache_dtype):
            raise NotImplementedError(
                f"attnserve strategies read a {self.kv_cache_dtype!r} KV cache only through 'full'; "
                "start the engine with kv_cache_dtype='auto'")
        return flash_cache_views(kv_cache, self.head_size)


class RoutingFlashBackend(FlashAttentionBackend):
    """Registered as ``CUSTOM``; ``get_name`` must say so (vLLM's ``Attention`` layer looks the name up
    in ``AttentionBackendEnum``)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[RoutingFlashImpl]:
        return RoutingFlashImpl

    @staticmethod
    def get_builder_cls() -> type[RoutingFlashMetadataBuilder]:
        return RoutingFlashMetadataBuilder
