"""`attnserve` command line → vLLM's own server arguments (no engine started)."""

import argparse

import pytest

from server.cli import build_parser, serve_settings
from server.config import GiB, ServeSettings, engine_arg_to_argv, parse_engine_arg


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
