"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import torch


@pytest.fixture
def shared_datasets(tmp_path_factory, monkeypatch) -> Path:
    """``$OVD_DATASETS`` in the session's base temp folder (a built-in world is generated once per test
    session and shared), the Hugging Face hub offline, two torch threads."""
    root = tmp_path_factory.getbasetemp() / "datasets"
    monkeypatch.setenv("OVD_DATASETS", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    return root
