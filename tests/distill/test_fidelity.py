"""Region fidelity computed from the evaluation's own forward passes equals the separate pass (issue #22)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.data.catalog import get_dataset
from ovd.data.coco import load_dataset
from ovd.data.loader import read_record_image
from ovd.distill.fidelity import FidelityCollector, region_fidelity
from ovd.distill.store import RegionStore, write_region_store
from ovd.engine.evaluate import predict_dataset
from ovd.engine.evaluate import test_augmentation as eval_augmentation
from ovd.modeling.build import build_model

REPO = Path(__file__).parents[2]


@pytest.fixture
def one_thread():
    """The tiny model runs 10x faster on one thread than on two busy cores (see conftest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("shared_datasets", "one_thread")
def test_fidelity_from_prediction_features_is_identical(tmp_path):
    fast = ["data.num_workers=0", "clip.pretrained=", "input.min_size_test=96", "model.rpn.post_nms_top_n_test=10",
            "model.roi_heads.score_thresh_test=0.9"]  # fmt: skip
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", fast)
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.nn.functional.normalize(torch.randn(16, 64), dim=1)).eval()
    info = get_dataset("ovshapes_small_val")
    records = [r for r in load_dataset(info) if len(r.boxes)][:8]
    k = max(len(r.boxes) for r in records)
    boxes = np.zeros((len(records), k, 4), np.float32)
    valid = np.zeros((len(records), k), bool)
    for i, r in enumerate(records):
        boxes[i, : len(r.boxes)], valid[i, : len(r.boxes)] = r.boxes, True
    emb = np.random.default_rng(0).normal(size=(len(records), k, 64)) * valid[..., None]
    ids = np.array([r.image_id for r in records], np.int64)
    store = RegionStore.open(write_region_store(tmp_path / "t", image_ids=ids, boxes=boxes, embeddings=emb,
                                                valid=valid, metadata={"dataset": info.name}))  # fmt: skip
    collector = FidelityCollector(model, store)
    predict_dataset(model, info, cfg, progress=False, on_features=collector)
    assert set(collector.students) == {int(i) for i in ids}  # images outside the store are skipped
    text = model.roi_heads.classifier.vocabulary[:-1]
    split = {"base_classes": info.base_classes, "novel_classes": info.novel_classes}
    aug = eval_augmentation(cfg)
    separate = region_fidelity(model, records, store, text, augmentation=aug, **split)
    fused = region_fidelity(model, records, store, text, augmentation=aug, students=collector.students, **split)
    assert separate == fused and separate["fidelity_regions_base"] > 0
    for r in records:  # the embeddings themselves, bit for bit
        b, _ = store.lookup(int(r.image_id))
        params = aug.sample(r.height, r.width, np.random.default_rng(0))
        image = torch.from_numpy(np.ascontiguousarray(params.apply_image(read_record_image(r))))
        batch = model.preprocess([image.permute(2, 0, 1)])
        with torch.no_grad():
            s = model.roi_heads.region_embeddings(model.features(batch), [torch.from_numpy(params.apply_boxes(b))],
                                                  batch.image_sizes)  # fmt: skip
        assert torch.equal(torch.nn.functional.normalize(s.float(), dim=1), collector.students[int(r.image_id)])
