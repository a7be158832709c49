"""Gate files: round trip with provenance, refused for another model, and the CLI end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.cli import main
from strategies.calibration import train as sc
from strategies.base import ParamError
from strategies.seer import Params, SeerGates, SeerStrategy

BLOCK = 16  # the block size of the session features (conftest.BLOCK)


def _gates(lm) -> SeerGates:
    cfg = sc.CalibrationConfig(block_size=BLOCK, init="random", param="free", gate_dim=16, rope_theta=1e4,
                                 seed=5)
    return sc.to_gates(sc.gate_params(lm.facts, cfg), lm.facts, cfg)


def test_gate_file_round_trips_with_provenance(lm, tmp_path):
    gates = _gates(lm)
    path = tmp_path / "g.safetensors"
    sc.save_gates(gates, path, {"config": {"seed": 5}, "date": "2026-11-29"})
    loaded = SeerGates.load(path)
    for n in SeerGates._META:
        assert getattr(loaded, n) == getattr(gates, n)
    for n in SeerGates._TENSORS:
        assert torch.equal(getattr(loaded, n), getattr(gates, n))
    meta = SeerGates.read_metadata(path)
    assert meta["calibration_date"] == "2026-11-29" and meta["calibration_config"] == '{"seed": 5}'
    assert loaded.problems(lm.facts, BLOCK) == []


def test_gates_of_another_model_are_refused(lm, tmp_path, monkeypatch):
    path = tmp_path / "g.safetensors"
    _gates(lm).save(path)
    other = dataclasses.replace(lm.facts, model_id="/models/Llama-3.2-1B", num_layers=16, kv_block_size=128)
    problems = SeerGates.load(path).problems(other, BLOCK)
    assert any("belong to model" in p for p in problems) and any("num_layers" in p for p in problems)
    with pytest.raises(ParamError) as err:
        SeerStrategy.validate_for_model(Params(block_size=BLOCK, gates=str(path)), other)
    assert err.value.field == "gates" and "does not fit this model" in str(err.value)



def test_seer_report_refuses_gates_of_another_model(model_dir, lm, tmp_path):
    path = tmp_path / "g.safetensors"
    dataclasses.replace(_gates(lm), model_id="Llama-3.2-1B").save(path)
    with pytest.raises(ValueError, match="belong to model 'Llama-3.2-1B'"):
        sc.seer_report(model_dir, path, seq_len=64, windows=1, progress=False)


def test_calibrate_seer_command_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "gates" / "seer.safetensors"
    rc = main(["calibrate-seer", "--model", str(model_dir), "--out", str(out), "--seq-len", "64", "--windows", "1",
               "--steps", "3", "--block-size", str(BLOCK), "--seed", "2"])
    assert rc == 0 and out.is_file()
    assert not (tmp_path / "gates" / "seer.safetensors.ckpt").exists()
    gates = SeerGates.load(out)
    assert gates.model_id == model_dir.name and gates.block_size == BLOCK and gates.num_layers == 30
    meta = SeerGates.read_metadata(out)
    assert '"seed": 2' in meta["calibration_config"] and "decode_kl" in meta["calibration_heldout_after"]
    assert main(["calibrate-seer", "--model", str(model_dir), "--out", str(out), "--if-missing"]) == 0
    assert "already calibrated" in capsys.readouterr().out
