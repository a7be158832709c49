"""Servers with production flags (tests/conftest.py's `launch_attnserve`), each module-scoped and
started only while its module runs, so at most one of them exists at a time.

- `prod_server`: API keys from the three sources, CORS, small bounds (2 concurrent requests, 1024
  max_tokens, n <= 2, 512 prompt tokens, 32 KiB bodies). Its module ends by SIGTERMing it.
- `fault_server`: a 4 s request timeout, /health and /metrics behind the key. Its module ends by
  killing its engine process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from production_helpers import (  # noqa: E402
    API_KEY, AUTH, CORS_ORIGIN, DRAIN_TIMEOUT_S, ENV_KEY, FILE_KEY, KV_CACHE_GIB, MAX_BODY_BYTES,
    MAX_CONCURRENT, MAX_N, MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT, PROD_MAX_MODEL_LEN,
    REQUEST_TIMEOUT_S,
)


def prod_args(keys_file) -> list[str]:
    return [
        "--api-key", API_KEY, "--api-keys-file", str(keys_file),
        "--cors-origins", CORS_ORIGIN, "--cors-methods", "GET,POST",
        "--max-concurrent-requests", str(MAX_CONCURRENT),
        "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--max-n", str(MAX_N),
        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-body-bytes", str(MAX_BODY_BYTES),
        "--drain-timeout", str(DRAIN_TIMEOUT_S),
    ]


@pytest.fixture(scope="module")
def prod_server(launch_attnserve, tmp_path_factory) -> Iterator:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# one key a line\n\n{FILE_KEY}\n")
    with launch_attnserve(prod_args(keys_file), env={"ATTNSERVE_API_KEYS": ENV_KEY},
                          max_model_len=PROD_MAX_MODEL_LEN, kv_cache_gib=KV_CACHE_GIB) as server:
        yield server


@pytest.fixture(scope="module")
def fault_server(launch_attnserve) -> Iterator:
    args = ["--api-key", API_KEY, "--protect-health", "--protect-metrics",
            "--request-timeout", str(REQUEST_TIMEOUT_S)]
    with launch_attnserve(args, env={"ATTNSERVE_API_KEYS": ""}, headers=AUTH,
                          max_model_len=PROD_MAX_MODEL_LEN, kv_cache_gib=KV_CACHE_GIB) as server:
        yield server


