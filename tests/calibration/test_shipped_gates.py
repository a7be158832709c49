"""The gates shipped for the embedded model are found by default and fit it; calibrated ones win."""
from pathlib import Path

from strategies.seer import SHIPPED_GATES_DIR, Params, SeerGates, SeerStrategy, resolve_gates
from strategies.base import ModelFacts


def embedded_model_facts(embedded_model_dir) -> ModelFacts:
    return ModelFacts.from_model_dir(embedded_model_dir)


def test_shipped_gates_are_the_default_for_the_embedded_model(embedded_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_GATES_DIR", str(tmp_path))      # no calibrated gates in the cache
    model = embedded_model_facts(embedded_model_dir)
    path = resolve_gates(None, model)
    assert path == SHIPPED_GATES_DIR / Path(model.model_id).name / "seer.safetensors"
    SeerStrategy.validate_for_model(Params(), model)                # raises ParamError if they do not fit
    gates = SeerGates.load(path)
    assert gates.problems(model, Params().block_size) == []
    meta = SeerGates.read_metadata(path)
    assert "calibration_command" in meta and meta["model_id"] == Path(model.model_id).name


def test_calibrated_gates_in_the_cache_take_precedence(embedded_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_GATES_DIR", str(tmp_path))
    model = embedded_model_facts(embedded_model_dir)
    own = tmp_path / Path(model.model_id).name / "seer.safetensors"
    own.parent.mkdir(parents=True)
    SeerGates.load(resolve_gates(None, model)).save(own)
    assert resolve_gates(None, model) == own
