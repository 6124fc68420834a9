"""Fixtures shared by the test modules."""

from importlib import util
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


TINY_CHECKPOINT_OVERRIDES = [
    "data.train=ovshapes_small_train",
    "data.test=",
    "data.num_workers=0",
    "clip.pretrained=",  # random-init tiny CLIP: no weights needed
    "solver.ims_per_batch=2",
    "solver.warmup_iters=2",
    "solver.max_iter=1",
    "input.min_size_train=[128]",
    "input.min_size_train_sampling=choice",
    "input.min_size_test=64",  # small test size: fast inference
    "model.rpn.post_nms_top_n_test=50",
]


@pytest.fixture
def tiny_train_overrides() -> list[str]:
    """The overrides of :func:`tiny_checkpoint`: a seconds-long OV-Shapes `small` run (add your own after)."""
    return list(TINY_CHECKPOINT_OVERRIDES)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 1-iteration OV-Shapes checkpoint and 3 val images; OVD_DATASETS points at a session-wide folder
    (generated once). Yields ``(checkpoint path, image paths)``."""
    from ovd.config import load_config
    from ovd.engine.trainer import train

    # One thread: on the shared 2-core CI box, 2 OpenMP threads made this tiny model's inference 10-30x
    # slower (spin-waiting on a busy core). Restored at the end of the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OVD_DATASETS", str(tmp_path_factory.getbasetemp() / "datasets"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        out = tmp_path_factory.mktemp("tiny_ckpt")
        train(load_config(Path(__file__).parents[1] / "configs/ovshapes/base.yaml", TINY_CHECKPOINT_OVERRIDES), out)
        images = sorted((tmp_path_factory.getbasetemp() / "datasets").rglob("small/val/*.png"))[:3]
        assert len(images) == 3
        yield out / "model_final.pth", images
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def easy_world():
    """``tests/easy_world.py`` as a module: the easy OV-Shapes worlds of the end-to-end floor tests."""
    spec = util.spec_from_file_location("easy_world", Path(__file__).parent / "easy_world.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
