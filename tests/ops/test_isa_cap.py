"""The ISA cap from the environment: ATTNSERVE_CPU_ISA, or its alias ATTNSERVE_ISA (ATTNSERVE_CPU_ISA
wins where both are set). Each case is a fresh interpreter: a process reads the cap once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRINT_LEVEL = "import torch; from strategies import ops; print(ops.cpu_isa())"


def level_with(env_cap: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNSERVE_CPU_ISA", "ATTNSERVE_ISA")}
    result = subprocess.run([sys.executable, "-c", PRINT_LEVEL], cwd=ROOT, env={**env, **env_cap},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("env_cap", [
    {"ATTNSERVE_CPU_ISA": "default"},
    {"ATTNSERVE_ISA": "default"},
    {"ATTNSERVE_CPU_ISA": "default", "ATTNSERVE_ISA": "avx512bf16"},
], ids=["ATTNSERVE_CPU_ISA", "ATTNSERVE_ISA", "both"])
def test_the_environment_caps_the_isa(env_cap):
    assert level_with(env_cap) == "default"


def test_ATTNSERVE_CPU_ISA_wins_over_its_alias():
    from tests.ops.conftest import cpu_isa_levels
    top = cpu_isa_levels()[-1]
    assert level_with({"ATTNSERVE_CPU_ISA": top, "ATTNSERVE_ISA": "default"}) == top
