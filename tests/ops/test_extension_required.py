"""strategies.ops without the compiled extension: an op raises a RuntimeError that says how to build
it, unless ATTNSERVE_ALLOW_REFERENCE=1 lets the pure-torch reference run. Each case is a fresh
interpreter in which `import strategies._C` fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from strategies import ops

ROOT = Path(__file__).resolve().parents[2]

# Blocks strategies._C, calls one op (topk_from_mass) twice and prints the outcome as JSON.
WITHOUT_EXTENSION = r"""
import importlib.abc, json, sys

class BlockExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "strategies._C":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, BlockExtension())
import torch
from strategies import ops, reference

mass = torch.tensor([[[0.1, 0.7, 0.2, 0.5]]])
token_idx = torch.tensor([[[3, 9, 4, 1]]], dtype=torch.int32)
num_idx = torch.tensor([[4]], dtype=torch.int32)
try:
    for _ in range(2):
        sel, sel_num = ops.topk_from_mass(mass, token_idx, num_idx, 2)
except RuntimeError as error:
    print(json.dumps({"loaded": ops.extension_loaded(), "error": str(error)}))
else:
    expected, expected_num = reference.topk_from_mass(mass, token_idx, num_idx, 2)
    print(json.dumps({"loaded": ops.extension_loaded(), "sel": sel.tolist(), "sel_num": sel_num.tolist(),
                      "expected": [expected.tolist(), expected_num.tolist()]}))
"""


def run_without_extension(allow_reference: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATTNSERVE_ALLOW_REFERENCE"}
    if allow_reference is not None:
        env["ATTNSERVE_ALLOW_REFERENCE"] = allow_reference
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_an_op_without_the_extension_raises_with_the_build_command():
    outcome, _ = run_without_extension(None)
    assert outcome["loaded"] is False
    assert "error" in outcome, f"the op ran without the extension: {outcome}"
    assert "not built" in outcome["error"] and "blocked by the test" in outcome["error"]
    assert "make setup" in outcome["error"]
    assert "python setup.py build_ext --inplace" in outcome["error"]
    assert "ATTNSERVE_ALLOW_REFERENCE=1" in outcome["error"]


def test_allow_reference_runs_the_reference_with_one_warning():
    outcome, log = run_without_extension("1")
    assert outcome["loaded"] is False
    assert "error" not in outcome, outcome
    assert [outcome["sel"], outcome["sel_num"]] == outcome["expected"]
    assert outcome["sel"] == [[[1, 9]]] and outcome["sel_num"] == [[2]]
    assert log.count("ATTNSERVE_ALLOW_REFERENCE=1") == 1, log


def test_a_device_without_a_kernel_raises_unless_the_reference_is_allowed(monkeypatch):
    monkeypatch.setattr(ops, "has_compiled", lambda name, device: False)
    monkeypatch.delenv("ATTNSERVE_ALLOW_REFERENCE", raising=False)
    mass = torch.tensor([[[0.1, 0.7, 0.2, 0.5]]])
    token_idx = torch.tensor([[[3, 9, 4, 1]]], dtype=torch.int32)
    num_idx = torch.tensor([[4]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="no CPU kernel for attnserve::topk_from_mass"):
        ops.topk_from_mass(mass, token_idx, num_idx, 2)
    monkeypatch.setenv("ATTNSERVE_ALLOW_REFERENCE", "1")
    sel, sel_num = ops.topk_from_mass(mass, token_idx, num_idx, 2)
    assert sel.tolist() == [[[1, 9]]] and sel_num.tolist() == [[2]]
