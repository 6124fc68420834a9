"""Region distillation inside the detector and the data pipeline."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.data.loader import DetectionDataset
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.modeling.build import build_model
from ovd.structures import ImageRecord

REPO = Path(__file__).parents[2]


class DictRegions:
    def __init__(self, table):
        self.table = table

    def lookup(self, image_id):
        return self.table[image_id]


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_stored_boxes_follow_the_image_transform(tmp_path, flip):
    img = np.zeros((120, 200, 3), np.uint8)
    img[30:71, 50:131] = 255  # a white rectangle: x 50..130, y 30..70 (inclusive pixels)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    rec = ImageRecord(image_id=7, file_name=str(tmp_path / "a.png"), height=120, width=200)
    stored = np.array([[50, 30, 131, 71], [0, 0, 0.5, 0.5]], np.float32)  # second one degenerates
    emb = np.eye(2, 4, dtype=np.float16)
    ds = DetectionDataset(
        [rec],
        ResizeFlipAugmentation((180,), 1000, flip_prob=flip),
        regions=DictRegions({7: (stored, emb)}),
        num_regions=5,
    )
    item = ds[0]
    image = item["image"].permute(1, 2, 0).numpy()
    ys, xs = np.nonzero(image[:, :, 0] > 127)
    tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    assert item["distill_boxes"].shape == (1, 4)  # the sub-pixel box is dropped after scaling
    assert np.abs(item["distill_boxes"][0].numpy() - tight).max() <= 1.0
    assert torch.equal(item["distill_embeddings"], torch.tensor(emb[:1], dtype=torch.float32))


def test_distillation_lowers_its_loss():
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", ["model.distill.enabled=true"])
    model = build_model(cfg, class_embeddings=torch.randn(16, 64)).train()
    assert model.distill_enabled
    image = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)
    regions = torch.tensor([[10.0, 10, 60, 70], [70, 20, 150, 110], [5, 80, 50, 125]])
    teacher = torch.nn.functional.normalize(torch.randn(3, 64), dim=1)
    target = {
        "boxes": regions[:1],
        "labels": torch.tensor([1]),
        "distill_boxes": regions,
        "distill_embeddings": teacher,
    }
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        losses = model([image], [target])
        distill = losses["loss_distill_l1"] + losses["loss_irm"]
        history.append(distill.item())
        opt.zero_grad()
        distill.backward()
        opt.step()
    assert history[-1] < 0.5 * history[0]  # (measured: ~31 → ~2.5)


def test_no_regions_gives_zero_distill_loss_with_graph():
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", ["model.distill.enabled=true"])
    model = build_model(cfg, class_embeddings=torch.randn(16, 64)).train()
    target = {
        "boxes": torch.tensor([[10.0, 10, 60, 70]]),
        "labels": torch.tensor([1]),
        "distill_boxes": torch.zeros(0, 4),
        "distill_embeddings": torch.zeros(0, 64),
    }
    losses = model([torch.zeros(3, 96, 96, dtype=torch.uint8)], [target])
    assert losses["loss_distill_l1"].item() == 0.0 and losses["loss_irm"].item() == 0.0
    sum(losses.values()).backward()


@pytest.mark.parametrize("group", [0, 1, 2])
def test_irm_is_averaged_over_image_groups(group):
    """IRM per group of ``irm_group_images`` images (the reference's per-GPU batch), then averaged."""
    from ovd.losses import irm_loss

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", ["model.distill.enabled=true",
                                                            f"model.distill.irm_group_images={group}"])  # fmt: skip
    heads = build_model(cfg, class_embeddings=torch.randn(16, 64)).roi_heads.eval()
    feats = {f"p{k}": torch.randn(3, 64, 160 // 2**k, 160 // 2**k) for k in range(3, 7)}
    boxes = [torch.tensor([[0.0, 0, 40, 40], [20, 30, 90, 100]]), torch.tensor([[5.0, 5, 60, 50]]),
             torch.tensor([[10.0, 0, 80, 70], [0, 0, 30, 30]])]  # fmt: skip
    teacher = [torch.randn(len(b), 64) for b in boxes]
    sizes = [(160, 160)] * 3
    with torch.no_grad():
        out = heads.distill_losses(feats, boxes, teacher, sizes)
        student = heads.region_embeddings(feats, boxes, sizes)  # (5, 64)
    t = torch.cat(teacher)
    parts = {0: [(0, 5)], 1: [(0, 2), (2, 3), (3, 5)], 2: [(0, 3), (3, 5)]}[group]
    expected = torch.stack([irm_loss(student[a:b], t[a:b]) for a, b in parts]).mean()
    assert out["loss_irm"].item() == pytest.approx(heads.distill_irm_weight * expected.item(), rel=1e-5)


def test_zero_weight_term_is_neither_computed_nor_logged():
    """A zero IRM weight (the OV-Shapes recipes) drops the key, as the reference does; L1 is unchanged
    and ``loss_names`` lists exactly the keys a batch returns (DDP logging relies on it)."""
    cfg = load_config(
        REPO / "configs/ovshapes/base.yaml", ["model.distill.enabled=true", "model.distill.irm_weight=0.0"]
    )
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(16, 64)).train()
    regions = torch.tensor([[10.0, 10, 60, 70], [70, 20, 150, 110]])
    teacher = torch.nn.functional.normalize(torch.randn(2, 64), dim=1)
    target = {"boxes": regions[:1], "labels": torch.tensor([1])}
    target |= {"distill_boxes": regions, "distill_embeddings": teacher}
    losses = model([torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)], [target])
    assert set(losses) == set(model.loss_names("box")) and "loss_irm" not in losses
    heads = model.roi_heads
    with torch.no_grad():
        batch = model.preprocess([torch.zeros(3, 8, 8, dtype=torch.uint8)])
        feats = {k: torch.randn(1, v.shape[1], 16, 20) for k, v in model.features(batch).items()}
        student = heads.region_embeddings(feats, [regions], [(128, 160)])
        out = heads.distill_losses(feats, [regions], [teacher], [(128, 160)])
    expected = (torch.nn.functional.normalize(student, dim=1) - teacher).abs().mean()  # mean over R·D
    assert list(out) == ["loss_distill_l1"]
    assert out["loss_distill_l1"].item() == pytest.approx(heads.distill_l1_weight * expected.item(), rel=1e-5)


class WeightedDictRegions(DictRegions):
    def __init__(self, table, weights):
        super().__init__(table)
        self.weights = weights

    def lookup_weights(self, image_id):
        return self.weights[image_id]


def test_region_weights_follow_the_kept_regions(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((120, 200, 3), np.uint8))
    rec = ImageRecord(image_id=7, file_name=str(tmp_path / "a.png"), height=120, width=200)
    stored = np.array([[50, 30, 131, 71], [0, 0, 0.5, 0.5], [10, 10, 40, 40]], np.float32)  # 2nd degenerates
    emb = np.eye(3, 4, dtype=np.float16)
    regions = WeightedDictRegions({7: (stored, emb)}, {7: np.array([0.25, 0.5, 1.0], np.float32)})
    ds = DetectionDataset([rec], ResizeFlipAugmentation((180,), 1000, flip_prob=0.0), regions=regions, num_regions=5)
    item = ds[0]
    assert item["distill_weights"].tolist() == [0.25, 1.0] and len(item["distill_boxes"]) == 2
    plain = DetectionDataset([rec], ResizeFlipAugmentation((180,), 1000), regions=DictRegions({7: (stored, emb)}),
                             num_regions=5)[0]  # fmt: skip
    assert "distill_weights" not in plain  # uniform: the reference's inputs, nothing added


def test_all_ones_region_weights_keep_the_losses_bitwise():
    """The existing loss path (L1 + IRM over image groups) with all-ones weights: identical values and
    gradients; other weights give the pure functions' weighted values."""
    from ovd.losses import distill_l1_loss, irm_loss

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", ["model.distill.enabled=true"])
    heads = build_model(cfg, class_embeddings=torch.randn(16, 64)).roi_heads.train()
    feats = {f"p{k}": torch.randn(3, 64, 160 // 2**k, 160 // 2**k, requires_grad=True) for k in range(3, 7)}
    boxes = [torch.tensor([[0.0, 0, 40, 40], [20, 30, 90, 100]]), torch.tensor([[5.0, 5, 60, 50]]),
             torch.tensor([[10.0, 0, 80, 70], [0, 0, 30, 30]])]  # fmt: skip
    teacher = [torch.randn(len(b), 64) for b in boxes]
    sizes = [(160, 160)] * 3

    def run(weights):
        out = heads.distill_losses(feats, boxes, teacher, sizes, weights)
        grads = torch.autograd.grad(sum(out.values()), [feats["p3"], *heads.parameters()], allow_unused=True)
        return out, grads

    plain, g_plain = run(None)
    ones, g_ones = run([torch.ones(len(b)) for b in boxes])
    assert set(plain) == {"loss_distill_l1", "loss_irm"}
    for k in plain:
        assert torch.equal(plain[k], ones[k])
    for a, b in zip(g_plain, g_ones, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    w = [torch.tensor([0.5, 1.0]), torch.tensor([0.0]), torch.tensor([1.0, 0.25])]
    out, _ = run(w)
    with torch.no_grad():
        s, t, wc = heads.region_embeddings(feats, boxes, sizes), torch.cat(teacher), torch.cat(w)
        l1 = heads.distill_l1_weight * distill_l1_loss(s, t, wc)
        groups = [irm_loss(s[a:b], t[a:b], wc[a:b]) for a, b in ((0, 3), (3, 5))]  # irm_group_images = 2
        irm = heads.distill_irm_weight * torch.stack(groups).mean()
    assert out["loss_distill_l1"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert out["loss_irm"].item() == pytest.approx(irm.item(), rel=1e-5)
