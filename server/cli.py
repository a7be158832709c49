"""`attnserve`: the command line.

Each subcommand is a `Command` (name, help, add_arguments, run): `serve` and `prepare-model` here, the
others (eval, bench, recommend, calibrate-seer, ...) from the `attnserve.commands` entry points of the
installed packages. Heavy imports (vLLM, torch) happen inside `run`.
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
    from server.model import DEFAULT_MODEL, known_names

    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
        help=f"a named model: {', '.join(known_names())} (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--output", default=None,
        help="target folder (default: $ATTNSERVE_CACHE/models/<the model's folder>, e.g. "
             "SmolLM2-135M-Instruct; cache default ~/.cache/attnserve)",
    )


def run_prepare_model(args: argparse.Namespace) -> int:
    from server.model import ModelError, UnknownModelError, get_model, prepare_model

    try:
        prepared = prepare_model(get_model(args.model).name, args.output)
    except UnknownModelError as err:
        print(f"attnserve prepare-model: {err}", file=sys.stderr)
        return 2
    except ModelError as err:
        print(f"attnserve prepare-model: {err}", file=sys.stderr)
        return 1
    state = "prepared" if prepared.converted else "already prepared"
    print(f"{state}: {prepared.path}")
    return 0


# -- serve ---------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from server.model import DEFAULT_MODEL, known_names

    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=config.DEFAULT_PORT)
    parser.add_argument(
        "--model", default=None,
        help=f"a named model ({', '.join(known_names())}: prepared on first use), a local "
             f"Hugging Face model folder or a hub id (default: {DEFAULT_MODEL})",
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
    parser.add_argument(
        "--allow-gate-paths", dest="allow_gate_paths", action="append", default=[], metavar="DIR",
        help="let requests name seer gate files by absolute path inside DIR (symlinks resolved; "
             "repeatable; also $ATTNSERVE_ALLOW_GATE_PATHS, os.pathsep-separated). Default: requests "
             "name gates only (identity, null, or a name under the gates dir)",
    )
    add_production_arguments(parser)


def _non_negative(kind: type) -> Callable[[str], object]:
    """A number >= 0 (`none`/`off` read as 0)."""
    def parse(text: str):
        if text.strip().lower() in ("none", "off"):
            return kind(0)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number >= 0 or none, got {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0 or none, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _positive_or_none(kind: type) -> Callable[[str], object]:
    """A bound: a positive number, or 0 / `none` for no bound."""
    def parse(text: str):
        if text.strip().lower() in ("none", "off", "0"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 0/none, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number or 0/none, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_production_arguments(parser: argparse.ArgumentParser) -> None:
    auth = parser.add_argument_group("authentication and CORS")
    auth.add_argument(
        "--api-key", dest="api_keys", action="append", default=[], metavar="KEY",
        help="accept `Authorization: Bearer KEY` (repeatable); with no key from here, "
             "--api-keys-file or $ATTNSERVE_API_KEYS the server is open",
    )
    auth.add_argument("--api-keys-file", dest="api_keys_files", action="append", default=[],
                      metavar="PATH", help="a file with one API key per line (# comments)")
    auth.add_argument("--protect-health", action="store_true",
                      help="require the API key for /health too (default: open)")
    auth.add_argument("--protect-metrics", action="store_true",
                      help="require the API key for /metrics too (default: open)")
    auth.add_argument("--cors-origins", type=_csv, default=[], metavar="ORIGINS",
                      help="comma-separated origins allowed by CORS (`*` for any; default: none)")
    auth.add_argument("--cors-methods", type=_csv, default=["*"], metavar="METHODS",
                      help="comma-separated methods allowed by CORS (default: *)")
    auth.add_argument("--cors-headers", type=_csv, default=["*"], metavar="HEADERS",
                      help="comma-separated request headers allowed by CORS (default: *)")
    auth.add_argument("--cors-allow-credentials", action="store_true",
                      help="allow credentials in CORS requests")
    limits = parser.add_argument_group("limits (0 or `none`: no bound)")
    limits.add_argument(
        "--max-concurrent-requests", type=_positive_or_none(int),
        default=config.DEFAULT_MAX_CONCURRENT_REQUESTS, metavar="N",
        help="running + queued generation requests; beyond it requests get 429 with Retry-After "
             f"at once (default {config.DEFAULT_MAX_CONCURRENT_REQUESTS})",
    )
    limits.add_argument(
        "--request-timeout", type=_positive_or_none(float), default=None, metavar="SECONDS",
        help="abort a generation request in the engine after this long (504; default: none)",
    )
    limits.add_argument(
        "--drain-timeout", type=float, default=config.DEFAULT_DRAIN_TIMEOUT_S, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may finish before they are aborted "
             f"(default {config.DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    limits.add_argument("--max-tokens-limit", type=_positive_or_none(int), default=None,
                        metavar="N", help="largest `max_tokens`/`max_completion_tokens` "
                        "(requests without one get this; default: the context length)")
    limits.add_argument("--max-n", type=_positive_or_none(int), default=config.DEFAULT_MAX_N,
                        metavar="N", help=f"largest `n` (default {config.DEFAULT_MAX_N})")
    limits.add_argument("--max-prompt-tokens", type=_positive_or_none(int), default=None,
                        metavar="N", help="longest prompt in tokens (default: the context length)")
    limits.add_argument(
        "--strategy-memory-gib", type=_non_negative(float), default=None, metavar="GIB",
        help="bound on the strategies' own buffers outside the KV cache (recycled's pool), reserved per "
             "request from its prompt and max_tokens; past it a request waits (--strategy-memory-wait), "
             "then gets 429; one that alone needs more gets 400 (default: the KV space, --kv-cache-gib)")
    limits.add_argument(
        "--strategy-memory-wait", type=_non_negative(float), default=config.DEFAULT_STRATEGY_MEMORY_WAIT_S,
        metavar="SECONDS", help="how long a request waits for room under --strategy-memory-gib before its 429 "
                                f"(default {config.DEFAULT_STRATEGY_MEMORY_WAIT_S:g}; 0: at once)")
    limits.add_argument("--max-body-bytes", type=_positive_or_none(int),
                        default=config.DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
                        help="largest request body; beyond it 413 "
                             f"(default {config.DEFAULT_MAX_BODY_BYTES})")


def serve_settings(args: argparse.Namespace) -> config.ServeSettings:
    from pathlib import Path

    from server.model import lookup_model, resolve_model
    from server.production import load_api_keys

    model = resolve_model(args.model)
    if args.served_model_name:
        name = args.served_model_name
    elif args.model is None or lookup_model(args.model) is not None:
        name = Path(model).name  # a named model: its folder's name (SmolLM2-135M-Instruct)
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
        api_keys=load_api_keys(args.api_keys, args.api_keys_files),
        protect_health=args.protect_health,
        protect_metrics=args.protect_metrics,
        cors_origins=tuple(args.cors_origins),
        cors_methods=tuple(args.cors_methods),
        cors_headers=tuple(args.cors_headers),
        cors_credentials=args.cors_allow_credentials,
        max_concurrent_requests=args.max_concurrent_requests,
        request_timeout=args.request_timeout,
        drain_timeout=max(0.0, args.drain_timeout),
        max_tokens_limit=args.max_tokens_limit,
        max_n=args.max_n,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes,
        strategy_memory_gib=args.strategy_memory_gib,
        strategy_memory_wait=args.strategy_memory_wait,
    )


def run_serve(args: argparse.Namespace) -> int:
    from strategies.registry import names

    if args.default_strategy not in names():
        print(f"attnserve serve: --default-strategy {args.default_strategy!r} is unknown; "
              f"valid strategies: {', '.join(names())}", file=sys.stderr)
        return 2
    if args.allow_gate_paths:
        import os
        from pathlib import Path

        from strategies.seer import ALLOW_GATE_PATHS_ENV

        dirs = [Path(d).expanduser() for d in args.allow_gate_paths]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            print(f"attnserve serve: --allow-gate-paths: not a directory: {', '.join(missing)}", file=sys.stderr)
            return 2
        # the environment carries it to vLLM's engine core and workers, which validate requests again
        given = [p for p in os.environ.get(ALLOW_GATE_PATHS_ENV, "").split(os.pathsep) if p]
        os.environ[ALLOW_GATE_PATHS_ENV] = os.pathsep.join(given + [str(d.resolve()) for d in dirs])

    from server.model import ModelError, UnknownModelError

    try:
        settings = serve_settings(args)
    except (OSError, UnknownModelError) as err:  # an unreadable --api-keys-file, a bad --model
        print(f"attnserve serve: {err}", file=sys.stderr)
        return 2
    except ModelError as err:  # a named model that could not be installed or assembled
        print(f"attnserve serve: {err}", file=sys.stderr)
        return 1

    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from server.app import run_server

    cli_env_setup()  # vLLM's process start method (spawn) for its engine-core and workers
    # 0 after a clean shutdown (SIGTERM/SIGINT, in-flight requests drained); non-zero when the
    # engine died, so that a supervisor restarts the server.
    return uvloop.run(run_server(settings))


# -- commands of other packages (eval / bench / recommend: bench/; calibrate-seer, seer-report,
# calibration-text: strategies/calibration/cli.py) ---------------------------------------------------
# The evaluation, the benchmarks and a strategy's tools declare their commands in the `attnserve.commands`
# entry-point group (pyproject.toml), so that the server imports none of them. An entry point names an
# object (a module, or a namespace) with COMMAND_HELP, add_arguments(parser) and run(args) -> int; with
# RESOLVES_MODEL true, `--model` (a folder or a known name; default: the embedded model) is resolved
# to a prepared folder before `run`.


def _with_model(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Resolve --model (default: the embedded model, prepared on first use) before `run`."""
    def wrapped(args: argparse.Namespace) -> int:
        from server.model import ModelError, resolve_model

        try:
            args.model = resolve_model(args.model)
        except ModelError as err:
            print(f"attnserve: {err}", file=sys.stderr)
            return 2
        return run(args)
    return wrapped


COMMAND_GROUP = "attnserve.commands"


def plugin_commands(taken: set[str]) -> tuple[Command, ...]:
    from importlib.metadata import entry_points

    commands = []
    for point in sorted(entry_points(group=COMMAND_GROUP), key=lambda p: p.name):
        if point.name in taken:
            continue
        try:
            entry = point.load()
            run = _with_model(entry.run) if getattr(entry, "RESOLVES_MODEL", False) else entry.run
            commands.append(Command(point.name, entry.COMMAND_HELP, entry.add_arguments, run))
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take `attnserve serve` down
            print(f"attnserve: command {point.name!r} ({point.value}) not loaded: {err}", file=sys.stderr)
    return tuple(commands)


COMMANDS: tuple[Command, ...] = (
    Command("serve", "serve the OpenAI-compatible API", add_serve_arguments, run_serve),
    Command("prepare-model", "convert a named model into the cache (idempotent)",
            add_prepare_model_arguments, run_prepare_model),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnserve",
        description="LLM inference server whose attention strategy is chosen per request.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS + plugin_commands({c.name for c in COMMANDS}):
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep this guard
    sys.exit(main())
