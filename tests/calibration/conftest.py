"""Fixtures of the calibration tests: the real embedded model and real captured queries/keys, captured
once per session on short windows (block 16 so that a short window still has many key blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

BLOCK = 16
SEQ_LEN = 256


@pytest.fixture(autouse=True)
def allow_tmp_gate_paths(tmp_path_factory, monkeypatch):
    """The calibration tests hand gate files to the seer strategy by path (an operator's local files): allow
    the session's temporary folders, as `attnserve serve --allow-gate-paths DIR` would."""
    monkeypatch.setenv("ATTNSERVE_ALLOW_GATE_PATHS", str(tmp_path_factory.getbasetemp().resolve()))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from server.model import prepare_embedded_model
    return Path(prepare_embedded_model().path)


@pytest.fixture(scope="session")
def lm(model_dir):
    from strategies.calibration.train import load_model
    return load_model(model_dir)


@pytest.fixture(scope="session")
def docs():
    from strategies.calibration.train import calibration_documents
    return calibration_documents()


@pytest.fixture(scope="session")
def train_features(lm, docs):
    from strategies.calibration.train import calibration_text, features, token_windows
    ids = token_windows(lm.tokenizer, calibration_text("train", docs), SEQ_LEN, 2)
    return features(lm, ids, block=BLOCK, rows_per_window=64, prefill_blocks=4, seed=0)


@pytest.fixture(scope="session")
def heldout_features(lm, docs):
    from strategies.calibration.train import calibration_text, features, token_windows
    ids = token_windows(lm.tokenizer, calibration_text("eval", docs), 320, 1)
    return features(lm, ids, block=BLOCK, rows_per_window=96, prefill_blocks=4, seed=1)


@pytest.fixture(scope="session")
def raw_qk(lm, docs):
    """Post-RoPE q [L, T, Hq, D], k [L, T, Hkv, D] of one held-out window of 170 tokens (a partial block)."""
    from strategies.calibration.train import calibration_text, capture_qk, tokenize_prefix
    ids = tokenize_prefix(lm.tokenizer, calibration_text("eval", docs), 170)
    return capture_qk(lm, ids)
