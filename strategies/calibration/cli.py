"""Command-line glue of the SeerAttention gate calibration: ``attnserve calibrate-seer``, ``seer-report``
and ``calibration-text``, declared as ``attnserve.commands`` entry points in pyproject.toml (the server
finds them there and resolves ``--model`` first: ``RESOLVES_MODEL``). Light: torch is imported only when a
command runs (``strategies.calibration.train``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from strategies.calibration.config import CalibrationConfig


# -- command line ------------------------------------------------------------------------------------

def add_calibrate_arguments(parser) -> None:
    d = CalibrationConfig()
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded model)")
    parser.add_argument("--out", default=None,
                        help="gate file (default: where seer looks for the model: "
                             "$ATTNSERVE_GATES_DIR/<model>/seer.safetensors)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration window")
    parser.add_argument("--windows", type=int, default=d.windows, help="calibration windows")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch", type=int, default=d.batch, help="windows per step")
    parser.add_argument("--eval-windows", type=int, default=1, help="held-out windows (loss before/after)")
    parser.add_argument("--rows", type=int, default=d.rows_per_window, help="decode rows per window (last 3/4)")
    parser.add_argument("--prefill-blocks", type=int, default=d.prefill_blocks,
                        help="prefill query blocks per window (from its last 3/4)")
    parser.add_argument("--rows-spacing", default=d.rows_spacing, choices=("log", "uniform"),
                        help="decode rows: log-spaced over [T/16, T) (prompt lengths T/16..T alike) or "
                             "uniform over the last 3/4 of each window")
    parser.add_argument("--block-size", type=int, default=d.block_size, choices=(16, 32, 64, 128))
    parser.add_argument("--gate-dim", type=int, default=None,
                        help="gate vector size (default: the model's head size, which the rotary gate needs)")
    parser.add_argument("--rope-theta", type=float, default=d.rope_theta,
                        help="gate RoPE at block positions (0: none; the cached keys are already rotated)")
    parser.add_argument("--init", default=d.init, choices=("identity", "random"))
    parser.add_argument("--param", default=d.param, choices=("rotary", "free"),
                        help="gate parametrisation: rotary = per RoPE frequency pair a complex weight per query "
                             "head and per pooled key (max/min/mean), so the gate score depends on relative "
                             "positions only and generalises to longer prompts; free = any linear map")
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt if present")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if --out exists (set-up)")


def run_calibrate(args) -> int:
    from strategies.base import ModelFacts
    from strategies.calibration.train import calibrate, default_gates_path
    model = _model_dir(args.model)
    gate_dim = args.gate_dim or ModelFacts.from_model_dir(model).head_size
    out = Path(args.out).expanduser() if args.out else default_gates_path(model)
    if args.if_missing and out.is_file():
        print(f"seer gates already calibrated: {out}")
        return 0
    cfg = CalibrationConfig(seed=args.seed, steps=args.steps, seq_len=args.seq_len, windows=args.windows,
                            lr=args.lr, batch=args.batch, block_size=args.block_size, gate_dim=gate_dim,
                            rope_theta=args.rope_theta, init=args.init, param=args.param, dtype=args.dtype,
                            rows_per_window=args.rows, rows_spacing=args.rows_spacing,
                            prefill_blocks=args.prefill_blocks)
    calibrate(model, out, cfg, resume=args.resume or args.if_missing, eval_windows=args.eval_windows)
    return 0


def add_report_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded model)")
    parser.add_argument("--gates", default=None,
                        help="gate file, or 'identity' for the training-free gate (default: the model's default gates)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per held-out window")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--rows", type=int, default=128, help="decode rows per window (last 3/4)")
    parser.add_argument("--out", default=None, help="also write the markdown here")


def run_report(args) -> int:
    from strategies.calibration.train import default_gates_path, seer_report
    model = _model_dir(args.model)
    gates = (args.gates if args.gates == "identity" else
             Path(args.gates).expanduser() if args.gates else default_gates_path(model))
    try:
        text = seer_report(model, gates, seq_len=args.seq_len, windows=args.windows, rows_per_window=args.rows)
    except ValueError as e:
        print(f"attnserve seer-report: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def add_text_arguments(parser) -> None:
    parser.add_argument("--out", required=True,
                        help="training text file; the held-out text goes to <stem>.eval<suffix> beside it")


def run_text(args) -> int:
    from strategies.calibration.train import write_calibration_text
    train_path, eval_path, info = write_calibration_text(args.out)
    print(json.dumps(info, indent=1))
    return 0


def _model_dir(model: Optional[str]) -> Path:
    if not model:   # server/cli.py resolves the embedded model before calling (strategies never import server)
        raise SystemExit("--model is required")
    return Path(model).expanduser()


# the `attnserve.commands` entry points
CALIBRATE_SEER = SimpleNamespace(COMMAND_HELP="calibrate SeerAttention gates for a model (base model frozen)",
                                 add_arguments=add_calibrate_arguments, run=run_calibrate, RESOLVES_MODEL=True)
SEER_REPORT = SimpleNamespace(COMMAND_HELP="recall of the attention mass vs sparsity of SeerAttention gates",
                              add_arguments=add_report_arguments, run=run_report, RESOLVES_MODEL=True)
CALIBRATION_TEXT = SimpleNamespace(COMMAND_HELP="write the offline calibration text (train + held-out)",
                                   add_arguments=add_text_arguments, run=run_text)
