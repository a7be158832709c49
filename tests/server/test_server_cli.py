"""`attnserve` command line → vLLM's own server arguments (no engine started)."""

import argparse

import pytest

from server.cli import build_parser, serve_settings
from server.config import (
    GiB,
    ServeSettings,
    cpu_dtype_argv,
    cpu_has_native_bf16,
    engine_arg_to_argv,
    forcing_enabled,
    logits_processors_argv,
    parse_engine_arg,
)
from strategies.engine.forcing import PROCESSOR_FQCN


def test_engine_arg_spellings():
    assert parse_engine_arg("max_num_seqs=8") == ("max-num-seqs", "8")
    assert parse_engine_arg("--enable-prefix-caching") == ("enable-prefix-caching", "true")
    assert engine_arg_to_argv("enable-prefix-caching", "false") == ["--no-enable-prefix-caching"]
    assert engine_arg_to_argv("enforce-eager", "true") == ["--enforce-eager"]
    assert engine_arg_to_argv("dtype", "bfloat16") == ["--dtype", "bfloat16"]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_engine_arg("=3")


def test_subcommands_exist():
    parser = build_parser()
    assert parser.parse_args(["prepare-model"]).command == "prepare-model"
    args = parser.parse_args(["serve", "--port", "9", "--engine-arg", "max_num_seqs=4"])
    assert args.port == 9 and args.engine_args == [("max-num-seqs", "4")]
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])


def test_serve_flags_reach_vllm_arguments(embedded_model_dir):
    args = build_parser().parse_args([
        "serve", "--model", str(embedded_model_dir), "--port", "8123", "--max-model-len", "4096",
        "--kv-cache-gib", "1.5", "--tensor-parallel-size", "1",
        "--distributed-executor-backend", "mp",
        "--engine-arg", "max_num_seqs=8", "--engine-arg", "enable_prefix_caching=false",
    ])
    settings = serve_settings(args)
    assert isinstance(settings, ServeSettings)
    assert settings.served_model_name == embedded_model_dir.name
    namespace = settings.vllm_namespace()
    assert namespace.model == str(embedded_model_dir)
    assert namespace.served_model_name == [embedded_model_dir.name]
    assert namespace.port == 8123
    assert namespace.max_model_len == 4096
    assert namespace.kv_cache_memory_bytes == int(1.5 * GiB)
    assert namespace.distributed_executor_backend == "mp"
    assert namespace.max_num_seqs == 8
    assert namespace.enable_prefix_caching is False
    assert namespace.enforce_eager is True
    # the teacher-forcing logits processor (vllm_xargs.attnserve_force_tokens) loads in the engine
    assert namespace.logits_processors == [PROCESSOR_FQCN]


def test_logits_processors_merge_with_given_ones_and_give_way_to_speculation():
    assert logits_processors_argv(()) == ["--logits-processors", PROCESSOR_FQCN]
    given = (("logits-processors", "a.b:C,d.e:F"),)
    assert logits_processors_argv(given) == ["--logits-processors", PROCESSOR_FQCN, "a.b:C", "d.e:F"]
    # vLLM refuses custom logits processors with speculative decoding: forcing is then off
    speculative = (("speculative-config", "{}"),)
    assert logits_processors_argv(speculative) == []
    assert logits_processors_argv(speculative + given) == ["--logits-processors", "a.b:C", "d.e:F"]
    assert forcing_enabled([PROCESSOR_FQCN]) and not forcing_enabled(None)


def test_production_flags_reach_the_settings(embedded_model_dir, tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n\nfile-key\nshared\n")
    monkeypatch.setenv("ATTNSERVE_API_KEYS", "env-a, env-b shared")
    args = build_parser().parse_args([
        "serve", "--model", str(embedded_model_dir),
        "--api-key", "cli-key", "--api-key", "shared", "--api-keys-file", str(keys),
        "--protect-metrics", "--cors-origins", "https://a.example,https://b.example",
        "--cors-methods", "GET,POST", "--max-concurrent-requests", "7",
        "--request-timeout", "2.5", "--drain-timeout", "9", "--max-tokens-limit", "100",
        "--max-n", "none", "--max-prompt-tokens", "50", "--max-body-bytes", "0",
    ])
    settings = serve_settings(args)
    assert settings.api_keys == ("cli-key", "shared", "file-key", "env-a", "env-b")
    assert (settings.protect_health, settings.protect_metrics) == (False, True)
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.cors_methods == ("GET", "POST") and settings.cors_headers == ("*",)
    assert settings.max_concurrent_requests == 7
    assert settings.request_timeout == 2.5 and settings.drain_timeout == 9
    assert settings.max_tokens_limit == 100 and settings.max_prompt_tokens == 50
    assert settings.max_n is None and settings.max_body_bytes is None  # none / 0: no bound


def test_production_defaults(embedded_model_dir, monkeypatch):
    from server import config

    monkeypatch.delenv("ATTNSERVE_API_KEYS", raising=False)
    settings = serve_settings(build_parser().parse_args(["serve", "--model",
                                                         str(embedded_model_dir)]))
    assert settings.api_keys == ()  # open unless a key is given
    assert settings.max_concurrent_requests == config.DEFAULT_MAX_CONCURRENT_REQUESTS
    assert settings.request_timeout is None
    assert settings.max_body_bytes == config.DEFAULT_MAX_BODY_BYTES


@pytest.mark.parametrize("bad", ["-1", "abc"])
@pytest.mark.parametrize("flag", ["--max-concurrent-requests", "--strategy-memory-gib", "--strategy-memory-wait"])
def test_bounds_reject_bad_values(flag, bad):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag, bad])


def test_strategy_memory_bound_defaults_to_the_kv_space(embedded_model_dir):
    from server import config

    def settings(*extra):
        return serve_settings(build_parser().parse_args(["serve", "--model", str(embedded_model_dir), *extra]))

    default = settings("--kv-cache-gib", "3")
    assert default.strategy_memory_bytes() == 3 * config.GiB
    assert default.strategy_memory_wait == config.DEFAULT_STRATEGY_MEMORY_WAIT_S
    given = settings("--kv-cache-gib", "3", "--strategy-memory-gib", "0.5", "--strategy-memory-wait", "0")
    assert given.strategy_memory_bytes() == config.GiB // 2 and given.strategy_memory_wait == 0
    assert settings("--strategy-memory-gib", "none").strategy_memory_bytes() is None     # no bound
    # a cache sized by vLLM itself (GPU memory utilisation): the engine's KV space
    sized_by_engine = settings("--kv-cache-gib", "0")
    assert sized_by_engine.kv_cache_gib is None and sized_by_engine.strategy_memory_bytes(12345) == 12345


def test_ray_backend_is_passed_through_to_vllm(embedded_model_dir):
    """Multi-node goes through vLLM's own options: the value reaches vLLM's parser unchanged
    (ray itself is only needed when the engine starts)."""
    args = build_parser().parse_args([
        "serve", "--model", str(embedded_model_dir), "--distributed-executor-backend", "ray",
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
    ])
    namespace = serve_settings(args).vllm_namespace()
    assert namespace.distributed_executor_backend == "ray"
    assert (namespace.tensor_parallel_size, namespace.pipeline_parallel_size) == (2, 2)


def test_ray_backend_without_ray_fails_at_start_naming_ray(embedded_model_dir, tmp_path):
    """Where ray cannot be imported (hidden here by a stub that fails to import, so the test is
    the same whether or not ray is installed) the server stops at start, non-zero, saying so."""
    import os
    import subprocess
    import sys

    stub = tmp_path / "ray"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(embedded_model_dir),
         "--host", "127.0.0.1", "--port", "0", "--kv-cache-gib", "1",
         "--distributed-executor-backend", "ray"],
        capture_output=True, text=True, timeout=600, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert result.returncode != 0
    assert "Failed to import Ray" in result.stdout + result.stderr


def test_allow_gate_paths_flag(tmp_path, capsys):
    from server.cli import run_serve

    args = build_parser().parse_args(["serve", "--allow-gate-paths", str(tmp_path),
                                      "--allow-gate-paths", str(tmp_path / "missing")])
    assert args.allow_gate_paths == [str(tmp_path), str(tmp_path / "missing")]
    assert run_serve(args) == 2                       # a folder that is not there: refused at start
    assert "--allow-gate-paths" in capsys.readouterr().err
    assert build_parser().parse_args(["serve"]).allow_gate_paths == []


def _model_folder(path, dtype: str, key: str = "dtype"):
    path.mkdir()
    (path / "config.json").write_text(f'{{"{key}": "{dtype}"}}')
    return str(path)


def test_a_bf16_model_is_served_in_float32_on_a_cpu_without_native_bf16(tmp_path):
    bf16 = _model_folder(tmp_path / "bf16", "bfloat16")
    f32 = _model_folder(tmp_path / "f32", "float32")
    assert cpu_dtype_argv(bf16, (), native_bf16=False) == ["--dtype", "float32"]
    assert cpu_dtype_argv(bf16, (), native_bf16=True) == []
    assert cpu_dtype_argv(f32, (), native_bf16=False) == []
    older = _model_folder(tmp_path / "older", "bfloat16", key="torch_dtype")   # transformers < 4.56
    assert cpu_dtype_argv(older, (), native_bf16=False) == ["--dtype", "float32"]
    assert cpu_dtype_argv(bf16, (("dtype", "bfloat16"),), native_bf16=False) == []   # explicit wins
    settings = ServeSettings(model=bf16, served_model_name="m", engine_args=(("dtype", "bfloat16"),))
    assert settings.vllm_namespace().dtype == "bfloat16"


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False), ("avx512f avx512_bf16", True),
                                           ("avx512f amx_bf16 amx_tile", True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native
