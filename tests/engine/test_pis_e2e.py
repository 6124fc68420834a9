"""Multi-source training end to end on OV-Shapes `small`: box + pseudo-box batches (PIS), the
image-label (max-size) mode, region distillation on both, and weight transfer initialised from an
RKD-style checkpoint (METHOD §1.5, §4.4, §5)."""

import json
from pathlib import Path

import pytest
import torch

from ovd.config import load_config
from ovd.data.catalog import get_dataset, register_dataset
from ovd.engine.checkpoint import load_checkpoint
from ovd.engine.trainer import train
from ovd.errors import OVDError

REPO = Path(__file__).parents[2]
FAST = [
    "data.test=ovshapes_small_val",
    "data.num_workers=0",
    "clip.pretrained=",  # random-init tiny CLIP
    "solver.warmup_iters=1",
    "solver.steps=[3]",
    "solver.checkpoint_period=2",
    "log_period=1",
    "input.min_size_train=[128]",
    "input.min_size_train_sampling=choice",
    "input.min_size_test=128",
    "model.rpn.post_nms_top_n_test=50",
]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path_factory.getbasetemp() / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


def _register(tmp_path: Path, name: str, ann_type: str) -> str:
    """``name``: the small train images with their (base) boxes as pseudo boxes and their classes as
    image-level labels (``ann_type`` "pseudo" or "image")."""
    train = get_dataset("ovshapes_small_train")
    data = json.loads(Path(train.ann_file_path).read_text())
    anns = [dict(a, score=0.9) for a in data["annotations"]]
    labels: dict[int, list[int]] = {}
    for a in anns:
        labels.setdefault(a["image_id"], []).append(a["category_id"])
    for img in data["images"]:
        img["pos_category_ids"] = sorted(set(labels.get(img["id"], [])))
    data["annotations"] = anns
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    from dataclasses import replace

    register_dataset(replace(train, name=name, ann_file=str(path), ann_type=ann_type, prepare=None), overwrite=True)
    return name


@pytest.fixture
def pseudo_dataset(tmp_path):
    return _register(tmp_path, "ovshapes_small_pseudo", "pseudo")


@pytest.fixture
def image_dataset(tmp_path):
    return _register(tmp_path, "ovshapes_small_tags", "image")


def _sources(pseudo: str, supervision: str = "pseudo", store: str = "") -> str:
    return (
        "data.sources=["
        f"{{dataset: ovshapes_small_train, batch_size: 1, ratio: 1, region_store: '{store}'}},"
        f"{{dataset: {pseudo}, supervision: {supervision}, batch_size: 2, ratio: 4, min_size: [96], max_size: 160,"
        f" region_store: '{store}'}}]"
    )


def test_box_and_pseudo_sources(tmp_path, pseudo_dataset):
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, "solver.max_iter=4", _sources(pseudo_dataset)])
    metrics = train(cfg, tmp_path)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["AP50_all"] == metrics["AP50_all"] and saved["dataset"] == "ovshapes_small_val"  # scored once, on val
    events = list((tmp_path / "tensorboard").iterdir())
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_image_label", "train/loss_cls", "train/loss_objectness"} <= tags
    image_losses = [e.value for e in acc.Scalars("train/loss_image_label")]
    cls_losses = [e.value for e in acc.Scalars("train/loss_cls")]
    # never-mixed batches: each step has either detection losses or the image-label loss
    assert all((a == 0) != (b == 0) for a, b in zip(image_losses, cls_losses, strict=True))
    assert any(v > 0 for v in image_losses) and any(v > 0 for v in cls_losses)


def test_max_size_mode(tmp_path, image_dataset):
    cfg = load_config(
        REPO / "configs/ovshapes/base.yaml",
        [*FAST, "solver.max_iter=3", "data.test=", _sources(image_dataset, "image")],
    )
    train(cfg, tmp_path)
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    image = [e.value for e in acc.Scalars("train/loss_image_label")]
    box = [e.value for e in acc.Scalars("train/loss_box_reg")]
    assert len(image) == 3 and any(v > 0 for v in image)  # the image-label (max-size) loss was trained ...
    assert all((a > 0) != (b > 0) for a, b in zip(image, box, strict=True))  # ... on its own batches only


def test_weight_transfer_starts_from_plain_checkpoint(tmp_path, pseudo_dataset):
    base = load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, "solver.max_iter=1", "data.test=",
                                                             "data.train=ovshapes_small_train"])  # fmt: skip
    train(base, tmp_path / "rkd")
    init = str(tmp_path / "rkd" / "model_final.pth")
    wt = load_config(
        REPO / "configs/ovshapes/base.yaml",
        [*FAST, "solver.max_iter=2", "data.test=", _sources(pseudo_dataset), "model.classifier.weight_transfer=true",
         "model.classifier.weight_transfer_hidden_dim=32", f"init_weights={init}"],
    )  # fmt: skip
    train(wt, tmp_path / "wt")
    before = load_checkpoint(init)["model"]
    after = load_checkpoint(tmp_path / "wt" / "model_final.pth")["model"]
    key = "roi_heads.classifier.linear.weight"
    assert torch.equal(before[key], after[key])  # the RKD projection stays frozen
    assert "roi_heads.classifier.fc1.weight" in after
    assert not torch.equal(before["roi_heads.box_regressor.fc2.weight"], after["roi_heads.box_regressor.fc2.weight"])


def test_bad_sources(tmp_path, pseudo_dataset):
    bad = load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, "data.sources=[{dataset: ovshapes_small_train,"
                                                            " supervision: pseudo}]"])  # fmt: skip
    with pytest.raises(OVDError, match="pseudo-label dataset"):
        train(bad, tmp_path)
    bad = load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, "data.sources=[{dataset: ovshapes_small_train,"
                                                            " supervision: boxes}]"])  # fmt: skip
    with pytest.raises(OVDError, match="unknown supervision"):
        train(bad, tmp_path)
    assert not list(tmp_path.glob("*.pth"))  # refused before anything was trained
