"""`attnserve`: the command line.

Each subcommand is a `Command` (name, help, add_arguments, run); add one to `COMMANDS` to extend it
(calibrate-seer, eval, bench, loadtest, ...). Heavy imports (vLLM, torch) happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from server import config


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- prepare-model -------------------------------------------------------------------------------


def add_prepare_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", default=None,
        help="target folder (default: $ATTNSERVE_CACHE/models/SmolLM2-135M-Instruct, "
             "cache default ~/.cache/attnserve)",
    )


def run_prepare_model(args: argparse.Namespace) -> int:
    from server.model import prepare_embedded_model

    prepared = prepare_embedded_model(args.output)
    state = "prepared" if prepared.converted else "already prepared"
    print(f"{state}: {prepared.path}")
    return 0


# -- serve ---------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=config.DEFAULT_PORT)
    parser.add_argument(
        "--model", default=None,
        help="a local Hugging Face model folder or a hub id (default: the embedded "
             "SmolLM2-135M-Instruct, prepared on first use)",
    )
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients send as `model` (default: the model's folder name)")
    parser.add_argument("--max-model-len", type=int, default=config.DEFAULT_MAX_MODEL_LEN,
                        help="context length in tokens (prompt + output)")
    parser.add_argument(
        "--kv-cache-gib", type=float, default=config.DEFAULT_KV_CACHE_GIB,
        help="KV cache size in GiB (on CPU instead of VLLM_CPU_KVCACHE_SPACE); 0: let vLLM size "
             "it from --gpu-memory-utilization",
    )
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=None,
        help="fraction of accelerator memory vLLM may use (on CPU: of the CPU memory)",
    )
    parser.add_argument("--default-strategy", default=config.DEFAULT_STRATEGY,
                        help="attention strategy of requests that do not choose one")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default=None,
                        choices=["mp", "ray", "uni", "external_launcher"])
    parser.add_argument(
        "--engine-arg", dest="engine_args", action="append", default=[],
        type=config.parse_engine_arg, metavar="KEY=VALUE",
        help="any other vLLM engine/server argument, e.g. --engine-arg max_num_seqs=8 "
             "(repeatable; true/false for boolean flags)",
    )
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])


def serve_settings(args: argparse.Namespace) -> config.ServeSettings:
    from pathlib import Path

    from server.model import EMBEDDED_MODEL_NAME, resolve_model

    model = resolve_model(args.model)
    if args.served_model_name:
        name = args.served_model_name
    elif args.model is None:
        name = EMBEDDED_MODEL_NAME
    elif Path(args.model).expanduser().is_dir():
        name = Path(args.model).expanduser().resolve().name  # a local folder: its name
    else:
        name = args.model  # a hub id, as given
    return config.ServeSettings(
        model=model,
        served_model_name=name,
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib or None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        default_strategy=args.default_strategy,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        engine_args=tuple(args.engine_args),
        log_level=args.log_level,
    )


def run_serve(args: argparse.Namespace) -> int:
    from strategies.registry import names

    if args.default_strategy not in names():
        print(f"attnserve serve: --default-strategy {args.default_strategy!r} is unknown; "
              f"valid strategies: {', '.join(names())}", file=sys.stderr)
        return 2
    settings = serve_settings(args)

    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from server.app import run_server

    cli_env_setup()  # vLLM's process start method (spawn) for its engine-core and workers
    uvloop.run(run_server(settings))
    return 0


# -- calibrate-seer, seer-report, calibration-text (strategies/seer_calibration_cli.py) -----------


def _with_model(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Resolve --model (default: the embedded model, prepared on first use) before `run`."""
    def wrapped(args: argparse.Namespace) -> int:
        from server.model import resolve_model

        args.model = resolve_model(args.model)
        return run(args)
    return wrapped


def _seer_calibration_commands() -> tuple[Command, ...]:
    from strategies import seer_calibration_cli as seer

    return (
        Command("calibrate-seer", "calibrate SeerAttention gates for a model (base model frozen)",
                seer.add_calibrate_arguments, _with_model(seer.run_calibrate)),
        Command("seer-report", "recall of the attention mass vs sparsity of SeerAttention gates",
                seer.add_report_arguments, _with_model(seer.run_report)),
        Command("calibration-text", "write the offline calibration text (train + held-out)",
                seer.add_text_arguments, seer.run_text),
    )


COMMANDS: tuple[Command, ...] = (
    Command("serve", "serve the OpenAI-compatible API", add_serve_arguments, run_serve),
    Command("prepare-model", "convert the embedded model into the cache (idempotent)",
            add_prepare_model_arguments, run_prepare_model),
    *_seer_calibration_commands(),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnserve",
        description="LLM inference server whose attention strategy is chosen per request.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep this guard
    sys.exit(main())
