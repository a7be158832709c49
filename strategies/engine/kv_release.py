"""Scheduler-side KV policy for per-request strategies (runs in the engine-core process).

1. ``sink`` gives back KV: before each allocation (``KVCacheManager.allocate_slots``, where vLLM itself
   frees out-of-window blocks of sliding-window layers), the blocks of a ``sink`` request lying wholly
   between its sinks and its window go back to the block pool and are replaced by the null block in
   its block table, exactly as ``SingleTypeKVCacheManager._remove_blocks_in_range`` does for
   sliding-window / R-SWA layers. Only tokens already processed count (``num_computed_tokens -
   num_in_flight_tokens``), and a query at position ``p`` sees keys ``< n_sink`` or ``> p - window``,
   so a block ending at or before ``processed - window`` is never read again. With ``dense_prefill``
   prompts are attended densely, so nothing is freed before the prompt is done. The worker keeps
   the old block ids but never reads them (sink attends only sinks + window).
2. KV computed by sparse attention is never shared through the prefix cache: a non-``full`` request
   caches only its prompt blocks when they are densely computed (``dense_prefill``), none otherwise,
   and a request whose prefill is sparse does not take cached (dense) blocks either. Freed
   prompt blocks keep their (correct) cached content until the pool reuses them, as vLLM's own
   sliding-window blocks do.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)

_installed = False
_POLICY_ATTR = "_attnserve_kv_policy"


class KvPolicy:
    """What the scheduler needs of one request's choice, computed once per request."""
    __slots__ = ("full", "cacheable_prompt", "kept_first_tokens", "kept_window")

    def __init__(self, full: bool, cacheable_prompt: bool, kept_first_tokens: int = 0,
                 kept_window: Optional[int] = None):
        self.full = full
        self.cacheable_prompt = cacheable_prompt
        self.kept_first_tokens = kept_first_tokens  # tokens [0, this) are always read (sink: the sinks)
        self.kept_window = kept_window              # the newest tokens read; None: the request releases nothing


_FULL = KvPolicy(full=True, cacheable_prompt=True)


def policy_of(request: Any) -> KvPolicy:
    policy = getattr(request, _POLICY_ATTR, None)
    if policy is not None:
        return policy
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    policy = _FULL
    if extra:
        from strategies import registry

        choice = registry.AttentionChoice.from_extra_args(extra)
        if choice.strategy != registry.FULL:
            cls = registry.get(choice.strategy)
            kept = None
            if cls.releases_kv:     # the same params as the worker's (Router.choice)
                kept = cls.kept_kv(choice.for_context(request.num_prompt_tokens, model=None).params)
            policy = KvPolicy(False, cls.prefills_densely(choice.params), *(kept or ()))
    try:
        setattr(request, _POLICY_ATTR, policy)
    except AttributeError:
        pass
    return policy


def released_range(policy: KvPolicy, processed: int, num_prompt_tokens: int, block_size: int,
                   dense_prefill: bool) -> tuple[int, int]:
    """Blocks ``[first, last)`` of a request that no future query reads."""
    if policy.kept_window is None or (dense_prefill and processed < num_prompt_tokens):
        return 0, 0
    first = -(-policy.kept_first_tokens // block_size)
    last = max(0, processed - policy.kept_window) // block_size
    return first, last


def install() -> None:
    global _installed
    if _installed:
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    original_lookup = KVCacheManager.get_computed_blocks
    original_allocate = KVCacheManager.allocate_slots
    original_cache = FullAttentionManager.cache_blocks

    def allocate_slots(self, request, *args, **kwargs):
        policy = policy_of(request)
        if policy.kept_window is not None:
            processed = max(0, request.num_computed_tokens - request.num_in_flight_tokens)
            for manager in self.coordinator.single_type_managers:
                if isinstance(manager, FullAttentionManager):
                    first, last = released_range(policy, processed, request.num_prompt_tokens,
                                                  manager.block_size, policy.cacheable_prompt)
                    if first < last:
                        manager._remove_blocks_in_range(request.request_id, first, last)
        return original_allocate(self, request, *args, **kwargs)

    def cache_blocks(self, request, num_tokens, *args, **kwargs):
        policy = policy_of(request)
        if not policy.full:
            num_tokens = min(num_tokens, request.num_prompt_tokens) if policy.cacheable_prompt else 0
        return original_cache(self, request, num_tokens, *args, **kwargs)

    def get_computed_blocks(self, request):
        if not policy_of(request).cacheable_prompt:   # its prefill is sparse: compute its own KV
            return self.empty_kv_cache_blocks, 0, 0
        return original_lookup(self, request)

    get_computed_blocks.__wrapped__ = original_lookup
    allocate_slots.__wrapped__ = original_allocate
    cache_blocks.__wrapped__ = original_cache
    KVCacheManager.get_computed_blocks = get_computed_blocks
    KVCacheManager.allocate_slots = allocate_slots
    FullAttentionManager.cache_blocks = cache_blocks
    _installed = True
