"""``load_trained_detector``: the one way Predictor, detector proposals, export and --eval-only get a model."""

from pathlib import Path

import pytest
import torch

from ovd.config import config_to_yaml, load_config
from ovd.errors import OVDError
from ovd.modeling.build import build_model
from ovd.runtime.detector import load_trained_detector

REPO = Path(__file__).parents[2]
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A randomly initialised OV-Shapes detector saved like the trainer's ``checkpoint_state``."""
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", ["clip.pretrained=", "input.min_size_test=64"])
    emb = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    model = build_model(cfg, class_embeddings=emb)
    state = {
        "model": model.state_dict(),
        "config": config_to_yaml(cfg),
        "vocabulary": {"class_names": NAMES, "embeddings": emb},
    }
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    torch.save(state, path)
    return path, state, cfg


def _refuse(names):
    raise AssertionError(f"the checkpoint's own vocabulary must not be re-encoded ({names})")


def test_loads_the_checkpoint_as_trained(saved):
    path, state, _ = saved
    loaded = load_trained_detector(path, encode=_refuse)
    assert loaded.class_names == NAMES and loaded.path == path
    assert torch.equal(loaded.class_embeddings, state["vocabulary"]["embeddings"])
    assert not loaded.model.training and loaded.model.device == torch.device("cpu")
    assert loaded.cfg.input.min_size_test == 64
    own = loaded.model.state_dict()
    assert own.keys() == state["model"].keys()
    assert all(torch.equal(own[k], v) for k, v in state["model"].items())
    # the same names given explicitly: still the stored embeddings (encode would fail)
    again = load_trained_detector(path, vocabulary=tuple(NAMES), encode=_refuse)
    assert torch.equal(again.class_embeddings, state["vocabulary"]["embeddings"])


def test_confidence_and_a_new_vocabulary(saved):
    path, state, _ = saved
    with pytest.raises(OVDError, match="model_final.pth: a vocabulary other than the checkpoint's needs a text"):
        load_trained_detector(path, vocabulary=["x", "y"])
    calls = []
    new = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)), dim=1)

    def encode(names):
        calls.append(list(names))
        return new

    loaded = load_trained_detector(path, vocabulary=["x", "y"], encode=encode, confidence=0.375)
    assert calls == [["x", "y"]] and loaded.class_names == ["x", "y"]
    assert loaded.model.num_classes == 2 and torch.equal(loaded.class_embeddings, new)
    assert loaded.model.roi_heads.score_thresh == 0.375
    assert loaded.cfg.model.roi_heads.score_thresh_test == 0.375
    # the weights are the checkpoint's all the same
    assert torch.equal(loaded.model.state_dict()["roi_heads.box_regressor.fc1.weight"],
                       state["model"]["roi_heads.box_regressor.fc1.weight"])  # fmt: skip


def test_given_config_and_incomplete_checkpoints(saved, tmp_path):
    path, state, cfg = saved
    weights_only = tmp_path / "weights_only.pth"
    torch.save({"model": state["model"]}, weights_only)
    with pytest.raises(OVDError, match="weights_only.pth: checkpoint has no config/vocabulary"):
        load_trained_detector(weights_only)
    with pytest.raises(OVDError, match="checkpoint has no config/vocabulary"):
        load_trained_detector(weights_only, cfg=cfg)  # no vocabulary to fall back on
    # --eval-only: the config file's model, the dataset's names embedded anew
    loaded = load_trained_detector(
        weights_only, cfg=cfg, vocabulary=NAMES, encode=lambda n: state["vocabulary"]["embeddings"]
    )
    assert loaded.cfg is cfg and loaded.class_names == NAMES
    other = load_config(REPO / "configs/ovshapes/base.yaml", ["clip.pretrained=", "model.roi_heads.fc_dim=48"])
    with pytest.raises(OVDError, match=r"model_final.pth: checkpoint does not match the model: \d+ shape mismatches"):
        load_trained_detector(path, cfg=other)
    with pytest.raises(OVDError, match="missing.pth: checkpoint not found"):
        load_trained_detector(tmp_path / "missing.pth")
