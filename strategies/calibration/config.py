"""Options of a SeerAttention gate calibration: light (no torch), shared by the command line and the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CalibrationConfig:
    """Options of one calibration (recorded in the gate file's metadata)."""
    seed: int = 0
    steps: int = 200
    seq_len: int = 8192
    windows: int = 3
    lr: float = 3e-2
    batch: int = 3
    rows_per_window: int = 256
    rows_spacing: str = "log"         # decode rows: log (T/16..T, every prompt length alike) | uniform (last 3/4)
    prefill_blocks: int = 4
    block_size: int = 64
    gate_dim: int = 64
    rope_theta: float = 0.0
    init: str = "identity"            # identity | random
    param: str = "rotary"             # rotary (commutes with RoPE: relative positions only) | free
    dtype: str = "float32"
