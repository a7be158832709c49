"""The routing attention backend: each request's rows go to its own strategy (design.md sections 3, 5).

Per engine step the builder (``build``, once) maps rows to strategies and splits them into
- the *dense* sub-batch: ``full`` rows and prefill rows of strategies with ``dense_prefill``; they run on
  vLLM's own kernel with vLLM's own metadata built for exactly those rows (a sliced
  ``CommonAttentionMetadata`` given to the parent builder, so the CPU kernel's scheduler metadata fits);
- one group per other strategy, described by a ``StepRows`` and planned once (``strategy.plan``).
Per layer the impl (``forward``) runs vLLM's kernel on the dense sub-batch and ``strategy.run`` on each
group, each writing its rows of ``output``. A step whose rows are all dense delegates to vLLM unchanged
(no gather, no copy). After the last layer each group's ``finish_step`` runs and the stats are written.

The routing itself (``RoutingBuilderMixin``, ``RoutingImplMixin``) does not depend on the platform: the
CPU backend here and the CUDA one (``strategies.engine.backend_cuda``, over FlashAttention) put the mixins in
front of vLLM's builder/impl, and differ only in ``strategy_cache_views`` (how the strategies see the
paged KV cache).

Row ``i`` of the step is ``runner.input_batch.req_ids[i]``; the runner is captured by the hook on
``GPUModelRunner._update_states`` (see ``strategies.engine.plugin`` for why this channel), which also releases
per-request state when a request finishes, is aborted or is preempted.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from strategies.engine import stats as stats_io
from strategies.engine.heap import HeapTrimmer
from strategies.base import AttentionUsage, ModelFacts, StepRows, Strategy, step_pairs
from strategies.registry import FULL

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Per-step metadata
# --------------------------------------------------------------------------------------------------

@dataclass
class RoutedGroup:
    """One strategy's rows in this step."""
    strategy: Strategy
    rows: StepRows
    plan: Any
    token_slice: Optional[slice]   # the rows' tokens as a contiguous range of the step, else None


@dataclass
class RoutedMetadata:
    """What ``build`` returns: vLLM's metadata for the dense rows and the routed groups."""
    num_actual_tokens: int
    dense: Optional[Any]                       # vLLM's own metadata (CPU/FlashAttention); None: no dense row
    dense_tokens: Optional[Tensor]             # int64 [T_d] rows of the step; None = contiguous
    dense_slice: Optional[slice]               # the dense tokens as a range (None: use dense_tokens)
    groups: list[RoutedGroup] = field(default_factory=list)
    stats_rows: list[tuple[str, str]] = field(default_factory=list)   # (request id, strategy) of the step
    all_rows: Optional[Any] = None             # vLLM's metadata for every row: the sliding-window layers of
                                               # a KV cache group that mixes them with global layers

    @property
    def slot_mapping(self) -> Optional[Tensor]:
        return None if self.dense is None else self.dense.slot_mapping


def _as_slice(tokens: list[int]) -> Optional[slice]:
    if tokens and tokens[-1] - tokens[0] + 1 == len(tokens):
        return slice(tokens[0], tokens[-1] + 1)
    return None


def slice_common_metadata(cm: CommonAttentionMetadata, rows: list[int], query_lens: np.ndarray,
                          seq_lens_cpu: np.ndarray, token_index: Tensor) -> CommonAttentionMetadata:
    """``cm`` restricted to ``rows`` (their tokens gathered in order by ``token_index``)."""
    device = cm.query_start_loc.device
    rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
    lens = query_lens[rows]
    qsl_cpu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    qsl_cpu[1:] = torch.from_numpy(np.cumsum(lens).astype(np.int32))
    upper = cm.seq_lens_cpu_upper_bound
    return CommonAttentionMetadata(
        query_start_loc=qsl_cpu.to(device),
        query_start_loc_cpu=qsl_cpu,
        seq_lens=cm.seq_lens.index_select(0, rows_t),
        num_reqs=len(rows),
        num_actual_tokens=int(lens.sum()),
        max_query_len=int(lens.max()),
        max_seq_len=int(seq_lens_cpu[rows].max()),
        block_table_tensor=cm.block_table_tensor.index_select(0, rows_t),
        slot_mapping=cm.slot_mapping.index_select(0, token_index.to(cm.slot_mapping.device)),
        causal=cm.causal.index_select(0, rows_t) if isinstance(cm.causal, Tensor) else cm.causal,
        positions=None if cm.positions is None else cm.positions.index_select(0, token_index),
        seq_lens_cpu_upper_bound=None if upper is None else upper[rows_t.cpu()],
    )


# --------------------------------------------------------------------------------------------------
# Per-process router: rows -> strategies, strategy objects, request lifetime, stats
# --------------------------------------------------------------------------------------------------

class Router:
    """One per worker process (module global ``ROUTER``)."""

    def __init__(self) -> None:
        self.runner: Any = None                       # vLLM's model runner (set by the hook)
        self.model: Optional[ModelFacts] = None
        self.strategies: dict[str, Strategy] = {}     # name -> instance, created lazily
        self.choices: dict[str, Any] = {}             # request id -> AttentionChoice
        self.dense_usage: dict[str, AttentionUsage] = {}   # request id -> its rows run by vLLM's kernel
        self.recently_released: deque[str] = deque(maxlen=4096)
        self.stats: Optional[stats_io.StatsWriter] = None
        self.tracked_changed = False
        self.last_held: dict[str, int] = {}           # strategy -> buffer bytes, as last written for /metrics
        self.unavailable: Optional[str] = None        # why no strategy but full can run in this worker
        self.unroutable_steps = 0
        self.heap = HeapTrimmer()

    # -- set-up (worker) -----------------------------------------------------------------------
    def attach(self, vllm_config: Any, block_size: int) -> None:
        if self.model is not None:
            return
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        scale, window_layers, sliding_window = attention_layer_facts(vllm_config)
        self.model = ModelFacts(
            num_layers=mc.get_total_num_hidden_layers(), num_q_heads=mc.get_num_attention_heads(pc),
            num_kv_heads=mc.get_num_kv_heads(pc), head_size=mc.get_head_size(),
            kv_block_size=block_size, max_model_len=mc.max_model_len, dtype=mc.dtype, model_id=mc.model,
            tp_rank=pc.rank % pc.tensor_parallel_size, tp_size=pc.tensor_parallel_size,   # ranks: DP x PP x TP
            layers=mc.get_layers_start_end_indices(pc), scale=scale, window_layers=window_layers,
            sliding_window=sliding_window)
        if window_layers:
            logger.info("attnserve: %d sliding-window layers (window %d) run vLLM's own kernel for every "
                        "request; the strategies attend on the other %d layers", len(window_layers),
                        sliding_window, self.model.num_layers - len(window_layers))
        self.stats = stats_io.StatsWriter.for_this_worker()
        install_runner_hook()

    def strategy(self, name: str) -> Strategy:
        strategy = self.strategies.get(name)
        if strategy is None:
            from strategies import registry

            assert self.model is not None
            strategy = self.strategies[name] = registry.get(name)(self.model)
        return strategy

    def choice(self, request_id: str) -> Any:
        choice = self.choices.get(request_id)
        if choice is None:
            from strategies import registry
            from strategies.registry import AttentionChoice

            state = self.runner.requests.get(request_id)
            sp = getattr(state, "sampling_params", None)
            choice = AttentionChoice.from_extra_args(getattr(sp, "extra_args", None))
            try:   # the server validated already; a request that slipped through must not stop the engine
                if self.unavailable is not None and choice.strategy != FULL:
                    raise ValueError(self.unavailable)
                registry.get(choice.strategy).validate_for_model(choice.params, self.model)
                choice = choice.for_context(state.num_prompt_tokens, self.model)
            except ValueError as error:
                logger.warning("request %s asked for %r: %s; running it with full attention",
                               request_id, choice.strategy, error)
                choice = AttentionChoice.default()
            self.choices[request_id] = choice
            self.tracked_changed = True
        return choice

    # -- request lifetime ----------------------------------------------------------------------
    def on_update_states(self, runner: Any, scheduler_output: Any) -> None:
        self.runner = runner
        for request_id in scheduler_output.finished_req_ids:
            self.release(request_id, finished=True)
        for request_id in scheduler_output.preempted_req_ids or ():
            self.release(request_id, finished=False)
        if self.tracked_changed and self.stats is not None:
            self.stats.write_live(self.live_state())
            self.tracked_changed = False
        self.heap.maybe_release()

    def release(self, request_id: str, finished: bool) -> None:
        """Finished/aborted: drop everything. Preempted: its KV is recomputed into new blocks, so the
        strategy forgets what it derived from the KV (``reset``) and keeps the stats."""
        if not finished:
            choice = self.choices.get(request_id)
            strategy = self.strategies.get(choice.strategy) if choice is not None else None
            if strategy is not None:
                strategy.reset(request_id)
            return
        choice = self.choices.pop(request_id, None)
        if choice is None:
            return
        self.tracked_changed = True
        self.dense_usage.pop(request_id, None)
        strategy = self.strategies.get(choice.strategy)
        if strategy is not None:
            strategy.release(request_id)
        self.recently_released.append(request_id)
        if self.stats is not None:
            self.stats.finished(request_id)
        if not self.choices:        # the worker is idle: the strategies' buffers go back to their floor
            for idle in self.strategies.values():
                idle.free_idle()
            self.heap.release_now()

    # -- per step --------------------------------------------------------------------------------
    def step_request_ids(self, num_reqs: int) -> Optional[list[str]]:
        """The request id of each row, or None for a warm-up/dummy batch (routed as all ``full``)."""
        runner = self.runner
        if runner is None:
            return None
        batch = runner.input_batch
        ids = batch.req_ids[:num_reqs] if batch.num_reqs == num_reqs else None
        if ids is None or any(i is None or i not in runner.requests for i in ids):
            if runner.requests:
                self.report_unroutable_step(num_reqs, batch.num_reqs)
            return None
        return ids

    def report_unroutable_step(self, num_reqs: int, batch_rows: int) -> None:
        """A step of real requests whose rows cannot be told apart runs vLLM's dense kernel for every row:
        sparse requests get full attention for that step, and a ``sink`` request's released blocks may
        be read. Should never happen; said loudly (the first time and every 100th) so it is seen."""
        self.unroutable_steps += 1
        if self.unroutable_steps % 100 != 1:
            return
        from strategies import registry

        sparse = sorted({c.strategy for c in self.choices.values() if c.strategy != FULL})
        releasing = [n for n in sparse if registry.get(n).releases_kv]
        logger.error("attnserve: a step of %d rows does not match the batch (%d rows; %d such steps so far): "
                     "every row runs full attention this step%s%s", num_reqs, batch_rows, self.unroutable_steps,
                     f"; requests of {', '.join(sparse)} are in flight" if sparse else "",
                     f"; the KV blocks released by {', '.join(releasing)} may be read" if releasing else "")

    def count_dense(self, request_id: str, query_len: int, seq_len: int) -> None:
        """A row run by vLLM's own kernel attends every (query, key) pair of its step (the window's on
        sliding-window layers)."""
        pairs = step_pairs(query_len, seq_len)
        attended = self.model.dense_step_attended(query_len, seq_len)
        self.dense_usage.setdefault(request_id, AttentionUsage()).add(attended, pairs, query_len == 1)

    def usage(self, request_id: str, strategy_name: str) -> AttentionUsage:
        """The request's dense rows (vLLM's kernel) and its strategy's own rows, together."""
        usage = AttentionUsage()
        usage += self.dense_usage.get(request_id, AttentionUsage())
        strategy = self.strategies.get(strategy_name)
        if strategy is not None and strategy_name != FULL:
            usage += strategy.stats(request_id)
        return usage

    def is_last_layer(self, layer_index: int) -> bool:
        """The last layer where the strategies run in this worker (its pipeline stage's last layer
        without a sliding window), after which the step is finished."""
        return layer_index == self.model.last_routed_layer

    def finish_step(self, meta: RoutedMetadata) -> None:
        for group in meta.groups:
            group.strategy.finish_step(group.plan)
        if self.stats is not None and meta.groups:
            held = self.held_bytes()
            if held != self.last_held:      # a buffer grew (or shrank): /metrics reads it from the live file
                self.tracked_changed = True
        if self.stats is not None:
            for request_id, name in meta.stats_rows:
                choice = self.choices.get(request_id)
                if choice is None:
                    continue
                self.stats.write(request_id, choice.strategy, choice.params.to_dict(),
                                 self.usage(request_id, name))

    # -- debug -----------------------------------------------------------------------------------
    def live_state(self) -> dict:
        """Requests tracked by this worker, and per-request state still held for released requests."""
        released = set(self.recently_released) - set(self.choices)
        leaked = 0
        for strategy in self.strategies.values():
            for value in vars(strategy).values():
                if isinstance(value, dict):
                    leaked += sum(1 for k in value if isinstance(k, str) and k in released)
        leaked += sum(1 for k in self.dense_usage if k not in self.choices)
        self.last_held = self.held_bytes()
        return {"pid": os.getpid(), "tracked": len(self.choices), "leaked": leaked,
                "per_strategy": {n: sum(1 for c in self.choices.values() if c.strategy == n)
                                 for n in self.strategies},
                "held_bytes": self.last_held}

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the strategies' own buffers in this worker, by strategy."""
        return {name: strategy.held_bytes() for name, strategy in self.strategies.items()}


ROUTER = Router()

_runner_hook_installed = False


def install_runner_hook() -> None:
    """Wrap ``GPUModelRunner._update_states`` (inherited by the CPU runner) in this process."""
    global _runner_hook_installed
    if _runner_hook_installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._update_states

    def _update_states(self, scheduler_output):
        ROUTER.on_update_states(self, scheduler_output)
        return original(self, scheduler_output)

    _update_states.__wrapped__ = original
    GPUModelRunner._update_states = _update_states
    _runner_hook_installed = True


# --------------------------------------------------------------------------------------------------
# Platform-independent routing, put in front of vLLM's builder / impl (MRO: mixin, then vLLM's class)
# --------------------------------------------------------------------------------------------------

class RoutingBuilderMixin:
    """``build`` of the routing backend; ``super().build`` is vLLM's own builder (dense sub-batch)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        ROUTER.attach(vllm_config, kv_cache_spec.block_size)
        from vllm.model_executor.models.utils import extract_layer_index

        # Sliding-window layers are left to vLLM's kernel (it applies the window; with the hybrid KV cache
        # manager their KV cache group even frees the blocks behind the window): a group made only of them
        # is never routed; a group mixing them with global layers also builds vLLM's metadata for all rows.
        indices = [extract_layer_index(name) for name in layer_names]
        windowed = [ROUTER.model.is_window_layer(i) for i in indices]
        self.attnserve_all_windowed = bool(windowed) and all(windowed)
        self.attnserve_some_windowed = any(windowed)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RoutedMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        if self.attnserve_all_windowed or ROUTER.model.last_routed_layer is None:
            request_ids = None      # vLLM's kernel for every row; counted by the group of the other layers
        else:
            request_ids = ROUTER.step_request_ids(num_reqs)
        if request_ids is None:
            return RoutedMetadata(cm.num_actual_tokens, super().build(common_prefix_len, cm, fast_build),
                                  None, None)

        qsl = cm.query_start_loc_cpu[: num_reqs + 1].numpy()
        query_lens = np.diff(qsl)
        seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                    else cm.seq_lens.cpu())[:num_reqs].numpy()

        prefilling = (cm.is_prefilling[:num_reqs].cpu().numpy() if cm.is_prefilling is not None
                      else query_lens > 1)
        dense_rows: list[int] = []
        routed: dict[str, list[int]] = {}
        stats_rows = []
        for row, request_id in enumerate(request_ids):
            choice = ROUTER.choice(request_id)
            name = choice.strategy
            stats_rows.append((request_id, name))
            if name == FULL or (prefilling[row] and ROUTER.strategy(name).prefills_densely(choice.params)):
                dense_rows.append(row)
                ROUTER.count_dense(request_id, int(query_lens[row]), int(seq_lens[row]))
            else:
                routed.setdefault(name, []).append(row)

        if not routed:
            return RoutedMetadata(cm.num_actual_tokens, super().build(common_prefix_len, cm, fast_build),
                                  None, None, stats_rows=stats_rows)

        def tokens_of(rows: list[int]) -> list[int]:
            out: list[int] = []
            for r in rows:
                out.extend(range(int(qsl[r]), int(qsl[r + 1])))
            return out

        dense = dense_tokens = dense_slice = None
        if dense_rows:
            tokens = tokens_of(dense_rows)
            dense_index = torch.tensor(tokens, dtype=torch.int64, device=cm.query_start_loc.device)
            sub = slice_common_metadata(cm, dense_rows, query_lens, seq_lens, dense_index)
            dense = super().build(0, sub, fast_build)
            dense_slice = _as_slice(tokens)
            dense_tokens = None if dense_slice is not None else dense_index

        groups = []
        for name, rows in routed.items():
            strategy = ROUTER.strategy(name)
            tokens = tokens_of(rows)
            device = cm.block_table_tensor.device
            rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
            step_rows = StepRows.build(
                request_ids=[request_ids[r] for r in rows],
                params=[ROUTER.choices[request_ids[r]].params for r in rows],
                query_lens=[int(query_lens[r]) for r in rows],
                seq_lens=[int(seq_lens[r]) for r in rows],
                block_table=cm.block_table_tensor.index_select(0, rows_t),
                token_index=torch.tensor(tokens, dtype=torch.int64, device=device))
            groups.append(RoutedGroup(strategy, step_rows, strategy.plan(step_rows), _as_slice(tokens)))
        all_rows = super().build(common_prefix_len, cm, fast_build) if self.attnserve_some_windowed else None
        return RoutedMetadata(cm.num_actual_tokens, dense, dense_tokens, dense_slice, groups, stats_rows,
                              all_rows)


class RoutingImplMixin:
    """``forward`` of the routing backend; ``super().forward`` is vLLM's own kernel (dense sub-batch).
    A platform's impl provides ``strategy_cache_views(kv_cache, layer)``."""
    layer_index: Optional[int] = None

    def strategy_cache_views(self, kv_cache: Tensor, layer) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, layer, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                attn_metadata: Optional[RoutedMetadata], output: Tensor,
                output_scale: Optional[Tensor] = None, output_block_scale: Optional[Tensor] = None) -> Tensor:
        """query/output [T, Hq, D]; kv_cache: vLLM's cache of the layer (read by ``strategy_cache_views``)."""
        if attn_metadata is None:   # warm-up
            return output
        if self.layer_index is None:
            self.layer_index = _layer_index(layer)
        if attn_metadata.groups and ROUTER.model.is_window_layer(self.layer_index):
            # a sliding-window layer in a group with global layers: vLLM's windowed kernel for every row
            super().forward(layer, query, key, value, kv_cache, attn_metadata.all_rows, output,
                            output_scale, output_block_scale)
            return output
        if not attn_metadata.groups:   # every row dense: vLLM's kernel, unchanged
            super().forward(layer, query, key, value, kv_cache, attn_metadata.dense, output,
                            output_scale, output_block_scale)
            if attn_metadata.stats_rows:
                self._after_layer(layer, attn_metadata)
            return output

        if attn_metadata.dense is not None:
            if attn_metadata.dense_slice is not None:
                s = attn_metadata.dense_slice
                super().forward(layer, query[s], key, value, kv_cache, attn_metadata.dense, output[s])
            else:
                idx = attn_metadata.dense_tokens
                dense_out = torch.empty((idx.numel(),) + tuple(output.shape[1:]),
                                        dtype=output.dtype, device=output.device)
                super().forward(layer, query.index_select(0, idx), key, value, kv_cache,
                                attn_metadata.dense, dense_out)
                output.index_copy_(0, idx, dense_out)

        key_cache, value_cache = self.strategy_cache_views(kv_cache, layer)
        for group in attn_metadata.groups:
            s = group.token_slice
            if s is not None:
                group.strategy.run(self.layer_index, query[s], key_cache, value_cache, group.plan, output[s])
            else:
                idx = group.rows.token_index
                out = torch.empty((idx.numel(),) + tuple(output.shape[1:]), dtype=output.dtype,
                                  device=output.device)
                group.strategy.run(self.layer_index, query.index_select(0, idx), key_cache, value_cache,
                                   group.plan, out)
                output.index_copy_(0, idx, out)
        self._after_layer(layer, attn_metadata)
        return output

    def _after_layer(self, layer, meta: RoutedMetadata) -> None:
        if self.layer_index is None:
            self.layer_index = _layer_index(layer)
        if ROUTER.is_last_layer(self.layer_index):
            ROUTER.finish_step(meta)


# --------------------------------------------------------------------------------------------------
# CPU backend
# --------------------------------------------------------------------------------------------------

# vLLM CPU attention ISAs whose KV cache layout the strategies read (strategy_cache_views).
READABLE_CPU_ATTENTION_ISAS = ("vec", "vec16")


def readable_cpu_attention_isa(vllm_isa: str, x86: bool) -> Optional[str]:
    """The CPU attention ISA to run: vLLM's choice when the strategies read its cache layout; on x86,
    'vec' in place of another (AMX machines: vLLM picks 'amx' for bf16, whose K layout is tiled), since
    vLLM's 'vec' kernels run on every x86 CPU; None where no readable layout exists (ARM's 'neon', ...)."""
    if vllm_isa in READABLE_CPU_ATTENTION_ISAS:
        return vllm_isa
    return "vec" if x86 else None


class RoutingCPUMetadataBuilder(RoutingBuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm.platforms import CpuArchEnum, current_platform

        readable = readable_cpu_attention_isa(self.isa, current_platform.get_cpu_architecture() == CpuArchEnum.X86)
        if readable is None:
            ROUTER.unavailable = (f"vLLM's CPU attention on this machine ({self.isa!r}) keeps the KV cache in a "
                                  f"layout attnserve's strategies cannot read; only full attention runs here")
            logger.error("attnserve: %s", ROUTER.unavailable)
        elif readable != self.isa:
            logger.warning("attnserve: vLLM's CPU attention uses %r instead of %r on this machine, so that the "
                           "strategies can read its KV cache (full attention runs vLLM's %r kernel, slower "
                           "than %r)", readable, self.isa, readable, self.isa)
            self.isa = readable
            self._set_isa_to_layers(layer_names)


class RoutingCPUImpl(RoutingImplMixin, CPUAttentionBackendImpl):
    def strategy_cache_views(self, kv_cache: Tensor, layer) -> tuple[Tensor, Tensor]:
        return strategy_cache_views(kv_cache, layer)


def strategy_cache_views(kv_cache: Tensor, layer) -> tuple[Tensor, Tensor]:
    """vLLM's CPU cache ``[num_blocks, Hkv, block_size, 2*D]`` holds, per (block, head), the K half then
    the V half (``cpu_attn.py``'s ``view(..., 2*block_size, D).chunk(2, 2)``). With the ``vec``/``vec16``
    ISAs ``cpu_attn_reshape_and_cache`` stores the K half transposed, ``[D, block_size]`` (checked
    against the kernel: tests/e2e), V token-major. Returns both as ``[num_blocks, Hkv, block_size, D]``
    views (K's head dim strided)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_half, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    isa = getattr(layer, "isa", "vec")
    if isa not in ("vec", "vec16"):
        raise NotImplementedError(
            f"attnserve strategies read vLLM's CPU KV cache in the 'vec' layout; this machine's "
            f"attention ISA is {isa!r}, whose K layout is not supported yet (only 'full' can run here)")
    head_size = value_cache.shape[-1]
    key_cache = key_half.reshape(num_blocks, num_kv_heads, head_size, block_size).transpose(2, 3)
    return key_cache, value_cache


def attention_layer_facts(vllm_config) -> tuple[Optional[float], tuple[int, ...], int]:
    """(softmax scale, sliding-window layer indices, their window) from the model's attention layers, as
    vLLM's impls hold them: Gemma scales by ``query_pre_attn_scalar ** -0.5``, not ``head_size ** -0.5``;
    Gemma 2/3 put a window on 5 layers of 6. The strategies use the same scale."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    scales, windows, window_layers = set(), set(), []
    try:
        layers = get_layers_from_vllm_config(vllm_config, Attention)
    except AttributeError:      # a bare config (tests): no layers built
        layers = {}
    if not layers:
        from strategies.base import attention_facts_from_config

        return attention_facts_from_config(vllm_config.model_config.hf_text_config.to_dict())
    for name, layer in layers.items():
        impl = getattr(layer, "impl", None)
        scale = getattr(impl, "scale", None)
        if scale is not None:
            scales.add(float(scale))
        window = getattr(impl, "sliding_window", None)
        if isinstance(window, (tuple, list)):   # FlashAttention's (left, right)
            window = window[0] + 1 if window[0] >= 0 else -1
        if window is not None and window > 0:
            windows.add(int(window))
            window_layers.append(extract_layer_index(name))
    if len(scales) > 1:
        raise ValueError(f"attnserve: the attention layers use different scales {sorted(scales)}")
    if len(windows) > 1:
        raise ValueError(f"attnserve: the sliding-window layers use different windows {sorted(windows)}")
    return (scales.pop() if scales else None, tuple(sorted(window_layers)),
            windows.pop() if windows else -1)


def _layer_index(layer) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer.layer_name)


class RoutingCPUBackend(CPUAttentionBackend):
    """Registered over ``CPU_ATTN`` (CpuPlatform always picks that name), so ``get_name`` keeps it."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[RoutingCPUImpl]:
        return RoutingCPUImpl

    @staticmethod
    def get_builder_cls() -> type[RoutingCPUMetadataBuilder]:
        return RoutingCPUMetadataBuilder
