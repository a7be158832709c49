"""`attnserve serve` settings and their translation into vLLM's own server arguments."""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from strategies.registry import DEFAULT_STRATEGY

logger = logging.getLogger(__name__)

GiB = 1 << 30

DEFAULT_PORT = 8000
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_KV_CACHE_GIB = 2.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 256
DEFAULT_MAX_N = 16
DEFAULT_MAX_BODY_BYTES = 16 * (1 << 20)
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_STRATEGY_MEMORY_WAIT_S = 30.0


@dataclass(frozen=True)
class ServeSettings:
    model: str  # a local HF folder or hub id (already resolved: the embedded model is a folder)
    served_model_name: str
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_model_len: int | None = DEFAULT_MAX_MODEL_LEN
    kv_cache_gib: float | None = DEFAULT_KV_CACHE_GIB
    gpu_memory_utilization: float | None = None
    default_strategy: str = DEFAULT_STRATEGY
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    engine_args: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (key, value)
    log_level: str = "info"
    # The production surface (server/production.py); None/0 where it means "no bound".
    api_keys: tuple[str, ...] = ()
    protect_health: bool = False
    protect_metrics: bool = False
    cors_origins: tuple[str, ...] = ()
    cors_methods: tuple[str, ...] = ("*",)
    cors_headers: tuple[str, ...] = ("*",)
    cors_credentials: bool = False
    max_concurrent_requests: int | None = DEFAULT_MAX_CONCURRENT_REQUESTS
    request_timeout: float | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    max_tokens_limit: int | None = None
    max_n: int | None = DEFAULT_MAX_N
    max_prompt_tokens: int | None = None
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    # The strategies' own buffers (server/resources.py): None = as large as the KV space, 0 = no bound.
    strategy_memory_gib: float | None = None
    strategy_memory_wait: float = DEFAULT_STRATEGY_MEMORY_WAIT_S

    def strategy_memory_bytes(self, kv_space_bytes: int | None = None) -> int | None:
        """The bound on the strategies' reserved buffer bytes (None: none): the flag, else the KV space
        (``--kv-cache-gib``, or the engine's when it sized the cache itself)."""
        if self.strategy_memory_gib is not None:
            return int(self.strategy_memory_gib * GiB) or None
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * GiB)
        return kv_space_bytes

    def vllm_argv(self) -> list[str]:
        """The argument list for vLLM's server parser (`make_arg_parser`)."""
        argv = [
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--pipeline-parallel-size", str(self.pipeline_parallel_size),
            "--uvicorn-log-level", self.log_level,
            # Our routing attention backend runs eagerly (host-side routing per step and layer; on CUDA
            # its builder reports no CUDA-graph support, strategies/engine/backend_cuda.py).
            "--enforce-eager",
        ]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_gib is not None:
            # On CPU this is VLLM_CPU_KVCACHE_SPACE's engine-arg twin; on GPU an explicit size.
            argv += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * GiB))]
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.distributed_executor_backend is not None:
            argv += ["--distributed-executor-backend", self.distributed_executor_backend]
        argv += routing_backend_argv()
        argv += cpu_dtype_argv(self.model, self.engine_args)
        for key, value in self.engine_args:
            if key != "logits-processors":
                argv += engine_arg_to_argv(key, value)
        argv += logits_processors_argv(self.engine_args)
        return argv

    def vllm_namespace(self) -> argparse.Namespace:
        """vLLM's full server Namespace (all of its defaults), as its own `init_app_state` wants."""
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = make_arg_parser(FlexibleArgumentParser(prog="attnserve serve", exit_on_error=False))
        args = parser.parse_args(self.vllm_argv())
        validate_parsed_serve_args(args)
        return args


def routing_backend_argv() -> list[str]:
    """On CUDA the plugin registers the routing backend as vLLM's ``CUSTOM`` attention backend, which
    vLLM uses only when asked (on CPU it replaces ``CPU_ATTN`` and nothing is needed). Left out when
    ``VLLM_PLUGINS`` excludes the plugin; an ``--engine-arg attention_backend=...`` comes later and wins."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return []
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "attnserve" not in [name.strip() for name in plugins.split(",")]:
        return []
    return ["--attention-backend", "CUSTOM"]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this x86 CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return True    # unknown: leave the model's dtype alone
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_dtype_argv(model: str, engine_args: tuple[tuple[str, str], ...],
                   native_bf16: bool | None = None) -> list[str]:
    """On a CPU without native bf16 a bf16 model is served in float32 (oneDNN emulates bf16 GEMMs
    there: Gemma 3 270M prefilled about half as fast in bf16 as in float32 on an AVX2 EPYC). An explicit
    ``--engine-arg dtype=...`` wins; nothing changes on GPUs or for models not stored in bf16."""
    from vllm.platforms import current_platform

    if any(key == "dtype" for key, _ in engine_args) or not current_platform.is_cpu():
        return []
    config = Path(model) / "config.json"
    try:
        facts = json.loads(config.read_text()) if config.is_file() else {}
        stored = facts.get("dtype", facts.get("torch_dtype"))     # transformers >= 4.56 writes "dtype"
    except (OSError, ValueError):
        stored = None
    if stored != "bfloat16" or (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        return []
    logger.info("attnserve: this CPU has no native bf16; serving the bf16 model in float32 "
                "(--engine-arg dtype=bfloat16 to keep bf16)")
    return ["--dtype", "float32"]


def logits_processors_argv(engine_args: tuple[tuple[str, str], ...]) -> list[str]:
    """vLLM's `--logits-processors`: attnserve's teacher-forcing processor
    (strategies/engine/forcing.py, `vllm_xargs.attnserve_force_tokens`) plus any given with
    `--engine-arg logits-processors=A,B` (vLLM keeps only the last `--logits-processors`). Left out
    with speculative decoding, where vLLM refuses custom logits processors: forcing is then
    unavailable and such requests get a 400."""
    from strategies.engine.forcing import PROCESSOR_FQCN

    given = [name for key, value in engine_args if key == "logits-processors"
             for name in value.replace(",", " ").split()]
    speculative = any(key == "speculative-config" for key, _ in engine_args)
    names = given if speculative else [PROCESSOR_FQCN, *(n for n in given if n != PROCESSOR_FQCN)]
    return ["--logits-processors", *names] if names else []


def forcing_enabled(logits_processors: list | tuple | None) -> bool:
    """Whether the engine was started with the teacher-forcing processor."""
    from strategies.engine.forcing import PROCESSOR_FQCN, ForcedTokensLogitsProcessor

    return any(p == PROCESSOR_FQCN or p is ForcedTokensLogitsProcessor
               for p in (logits_processors or ()))


def parse_engine_arg(text: str) -> tuple[str, str]:
    """`KEY=VALUE` (KEY in vLLM's spelling, `max_num_seqs` or `max-num-seqs`); a bare KEY is a
    boolean flag set to true."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if not sep:
        value = "true"
    return key.replace("_", "-"), value


def engine_arg_to_argv(key: str, value: str) -> list[str]:
    """Booleans become vLLM's `--flag` / `--no-flag`; everything else `--key value`."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on"):
        return [f"--{key}"]
    if lowered in ("false", "no", "off"):
        return [f"--no-{key}"]
    return [f"--{key}", value]
