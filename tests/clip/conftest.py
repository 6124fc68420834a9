"""Shared set-up of the CLIP tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _hermetic(request, monkeypatch, tmp_path):
    """No downloads (HF offline mode and, except for ``weights`` tests, an empty HF cache; huggingface_hub
    reads both at import) and one torch thread (tiny ops on a shared 2-core machine are ~20× slower with
    thread contention). A ``weights`` test reads the real (configured or default) cache, so that it runs
    where the weights are and skips where they are not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    if request.node.get_closest_marker("weights") is None:
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
