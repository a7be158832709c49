"""Preparation of the embedded model: idempotent, and never taking a half-written folder for a
finished one. (The conversion itself runs once per machine through `attnserve prepare-model`.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import model as model_module
from server.model import REQUIRED_FILES, find_gguf, is_prepared, prepare_embedded_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_gguf_is_found_in_site_packages():
    gguf = find_gguf()
    assert gguf.name == model_module.GGUF_FILE
    assert gguf.stat().st_size > 10_000_000


def test_prepared_model_is_not_converted_again(embedded_model_dir, monkeypatch):
    weights = embedded_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def refuse(*_):
        raise AssertionError("a prepared model must not be converted again")

    monkeypatch.setattr(model_module, "_convert", refuse)
    prepared = prepare_embedded_model(embedded_model_dir)
    assert prepared.path == embedded_model_dir
    assert not prepared.converted
    assert weights.stat().st_mtime_ns == before


def test_cache_location_follows_attnserve_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path))
    assert model_module.embedded_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_incomplete_folder_is_not_prepared(tmp_path, missing):
    for name in REQUIRED_FILES:
        if name != missing:
            (tmp_path / name).write_text("{}")
    assert not is_prepared(tmp_path)


def test_cli_prepare_model_reports_already_prepared(embedded_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "prepare-model", "--output", str(embedded_model_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert f"already prepared: {embedded_model_dir}" in result.stdout
