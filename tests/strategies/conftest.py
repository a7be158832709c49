"""Fixtures of the strategies tests (helpers: synthetic_kv.py)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gates_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_GATES_DIR", str(tmp_path / "gates"))
    return tmp_path / "gates"
