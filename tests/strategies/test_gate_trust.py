"""Trust boundary of seer's ``gates`` param: requests name server-side gates; a path is refused (without
opening or stat'ing it, with one message whether or not it exists) unless it lies inside a directory the
operator allowed (--allow-gate-paths / $ATTNSERVE_ALLOW_GATE_PATHS), symlinks resolved."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest
import torch

from strategies import registry
from strategies.base import ModelFacts, ParamError
from strategies.seer import ALLOW_GATE_PATHS_ENV, SeerGates, resolve_gates

MODEL = ModelFacts(num_layers=2, num_q_heads=4, num_kv_heads=2, head_size=16, kv_block_size=64,
                   max_model_len=4096, dtype=torch.float32, model_id="test-model")
Seer = registry.get("seer")


def parse(gates):
    return registry.parse_attention({"strategy": "seer", "params": {"block_size": 32, "gates": gates}})


def refusal(gates) -> ParamError:
    with pytest.raises(ParamError) as info:
        choice = parse(gates)
        Seer.validate_for_model(choice.params, MODEL)      # (not reached: the parse refuses it)
    return info.value


@pytest.fixture
def no_allowed_paths(monkeypatch):
    monkeypatch.delenv(ALLOW_GATE_PATHS_ENV, raising=False)


@pytest.fixture
def allowed(tmp_path, monkeypatch) -> Path:
    folder = (tmp_path / "allowed").resolve()
    folder.mkdir()
    monkeypatch.setenv(ALLOW_GATE_PATHS_ENV, str(folder))
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    """A real gate file outside the allowed set."""
    path = tmp_path / "outside" / "real.safetensors"
    SeerGates.identity(MODEL, 32).save(path)
    return path


@pytest.fixture
def file_access(monkeypatch) -> list:
    """Records every attempt to open, stat or read metadata of a file."""
    calls = []
    real_open, real_is_file, real_exists, real_stat = builtins.open, Path.is_file, Path.exists, Path.stat
    import safetensors

    real_safe_open = safetensors.safe_open

    def record(name, real):
        def wrapped(*args, **kwargs):
            calls.append((name, str(args[0])))
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(builtins, "open", record("open", real_open))
    monkeypatch.setattr(Path, "is_file", record("is_file", real_is_file))
    monkeypatch.setattr(Path, "exists", record("exists", real_exists))
    monkeypatch.setattr(Path, "stat", record("stat", real_stat))
    monkeypatch.setattr(safetensors, "safe_open", record("safe_open", real_safe_open))
    return calls


@pytest.mark.parametrize("allow", [False, True], ids=["no-allowed-dirs", "outside-allowed-dirs"])
def test_a_path_outside_is_refused_alike_for_existing_and_missing_files(allow, tmp_path, outside, monkeypatch):
    if allow:
        folder = tmp_path / "allowed"
        folder.mkdir()
        monkeypatch.setenv(ALLOW_GATE_PATHS_ENV, str(folder))
    else:
        monkeypatch.delenv(ALLOW_GATE_PATHS_ENV, raising=False)
    missing = outside.parent / "missing.safetensors"
    errors = [refusal(str(p)) for p in (outside, missing, Path("/etc/passwd"), Path("/no/such/dir/x"))]
    assert {e.field for e in errors} == {"attention.params.gates"}
    assert len({e.message for e in errors}) == 1, [e.message for e in errors]
    assert "real" not in errors[0].message and "missing" not in errors[0].message
    assert "--allow-gate-paths" in errors[0].message


def test_a_path_outside_is_never_opened(no_allowed_paths, outside, file_access):
    refusal(str(outside))
    with pytest.raises(ParamError) as info:        # the worker's check (Router.choice) refuses it too
        resolve_gates(str(outside), MODEL)
    assert info.value.field == "gates"
    assert not [c for c in file_access if c[1].startswith(str(outside.parent))], file_access


def test_a_path_outside_the_allowed_dirs_is_never_opened(allowed, outside, file_access):
    refusal(str(outside))
    with pytest.raises(ParamError):
        resolve_gates(str(outside), MODEL)
    assert not [c for c in file_access if c[1].startswith(str(outside.parent))], file_access


def test_a_fifo_outside_does_not_block(no_allowed_paths, tmp_path):
    fifo = tmp_path / "outside" / "gates.safetensors"
    fifo.parent.mkdir()
    os.mkfifo(fifo)            # opening it for reading would block this test
    assert refusal(str(fifo)).field == "attention.params.gates"


def test_a_file_inside_an_allowed_dir_works(allowed):
    path = allowed / "mine.safetensors"
    SeerGates.identity(MODEL, 32).save(path)
    choice = parse(str(path))
    Seer.validate_for_model(choice.params, MODEL)
    assert resolve_gates(str(path), MODEL) == path
    strategy = Seer(MODEL)
    assert strategy.gates_for(choice.params, torch.device("cpu")).block_size == 32


def test_inside_an_allowed_dir_a_missing_or_foreign_file_is_a_clear_error(allowed):
    with pytest.raises(ParamError) as info:
        Seer.validate_for_model(parse(str(allowed / "missing.safetensors")).params, MODEL)
    assert info.value.field == "gates" and "no SeerAttention gates" in info.value.message
    junk = allowed / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ParamError) as info:
        Seer.validate_for_model(parse(str(junk)).params, MODEL)
    assert info.value.field == "gates" and "not a readable" in info.value.message


def test_a_symlink_out_of_an_allowed_dir_is_refused(allowed, outside):
    link = allowed / "escape.safetensors"
    link.symlink_to(outside)
    dir_link = allowed / "up"
    dir_link.symlink_to(outside.parent, target_is_directory=True)
    messages = {refusal(str(p)).message for p in (link, dir_link / outside.name, allowed / ".." / "outside" / outside.name)}
    assert len(messages) == 1
    assert messages == {refusal(str(outside)).message}


def test_a_relative_path_is_refused(allowed, monkeypatch):
    (allowed / "rel.safetensors").touch()
    monkeypatch.chdir(allowed)
    assert refusal("rel.safetensors").field == "attention.params.gates"
    assert refusal("./rel.safetensors").field == "attention.params.gates"


@pytest.mark.parametrize("name", ["../seer", ".hidden", "a/b", "a\\b", "a b", "", "x" * 200, "seer\x00", "~root"])
def test_names_are_restricted(no_allowed_paths, name):
    assert refusal(name).field == "attention.params.gates"


def test_a_name_is_looked_up_under_the_gates_dir(no_allowed_paths, gates_dir):
    path = gates_dir / MODEL.model_id / "custom-1.0_b.safetensors"
    SeerGates.identity(MODEL, 32).save(path)
    choice = parse("custom-1.0_b")
    Seer.validate_for_model(choice.params, MODEL)
    assert resolve_gates("custom-1.0_b", MODEL) == path
    with pytest.raises(ParamError) as info:
        Seer.validate_for_model(parse("absent").params, MODEL)
    assert info.value.field == "gates" and "calibrate" in info.value.message


def test_the_worker_falls_back_to_full_for_a_path(no_allowed_paths, outside):
    stored = {"strategy": "seer", "params": {"block_size": 32, "gates": str(outside)}}
    assert registry.AttentionChoice.from_extra_args(stored).strategy == "full"


def test_strategies_listing_describes_the_trust_boundary():
    seer = next(s for s in registry.describe_all() if s["name"] == "seer")
    doc = next(p for p in seer["params"] if p["name"] == "gates")["description"]
    assert "--allow-gate-paths" in doc and "identity" in doc
