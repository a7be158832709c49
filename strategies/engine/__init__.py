"""The vLLM side of the strategies: the plugin vLLM loads in every process (``plugin``), the routing
attention backends (``backend`` on CPU, ``backend_cuda`` over FlashAttention), the scheduler's KV release
(``kv_release``), the per-request stats the workers leave for the API process (``stats``) and the
teacher-forcing logits processor (``forcing``)."""
