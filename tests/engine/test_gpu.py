"""CUDA and mixed-precision paths (skipped without a GPU)."""

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from ovd.config import load_config
from ovd.engine.checkpoint import load_checkpoint
from ovd.engine.trainer import train
from ovd.modeling.build import build_model
from ovd.structures import ImageRecord

REPO = Path(__file__).parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
FAST = [
    "data.train=ovshapes_small_train",
    "data.test=ovshapes_small_val",
    "data.num_workers=2",
    "clip.pretrained=",
    "solver.ims_per_batch=4",
    "solver.base_lr=0.005",
    "solver.warmup_iters=5",
    "solver.clip_grad_norm=5.0",  # exercises unscale-then-clip with the GradScaler
    "solver.checkpoint_period=5",
]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path_factory.getbasetemp() / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("amp", ["off", "float16", "bfloat16"])
def test_cuda_training_and_eval(tmp_path, amp):
    dtype = [] if amp == "off" else ["solver.amp=true", f"solver.amp_dtype={amp}"]
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", [*FAST, "device=cuda", *dtype, "solver.max_iter=10"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(cfg, tmp_path)
    # the GradScaler's skipped first steps do not make torch warn about the scheduler's order
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    state = load_checkpoint(tmp_path / "model_final.pth")
    assert state["iteration"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if amp == "float16":
        assert state["scaler"]["scale"] > 0  # the GradScaler state is saved for --resume
    elif amp == "bfloat16":
        assert not state["scaler"]  # bfloat16 needs no loss scaling: the scaler stays disabled
    assert 0.0 <= metrics["AP50_all"] <= 100.0


def test_cuda_and_cpu_inference_agree():
    cfg = load_config(REPO / "configs/ovshapes/base.yaml", ["model.roi_heads.score_thresh_test=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(16, 64)).eval()
    image = torch.randint(0, 255, (3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        cpu = model([image])[0]
        gpu = model.cuda()([image.cuda()])[0].to("cpu")
    # the same detections up to float rounding (cuDNN and MKL-DNN convolutions differ in the last
    # bits, which can reorder near-ties): every top GPU detection has a CPU twin
    assert len(gpu) > 0
    for box, score, label in zip(gpu.boxes[:5], gpu.scores[:5], gpu.labels[:5], strict=True):
        same = (cpu.labels == label) & ((cpu.scores - score).abs() < 1e-3)
        iou = box_iou(box[None], cpu.boxes[same])
        assert iou.numel() and iou.max() > 0.99


def test_cuda_pipeline_amp(tmp_path):
    """Every stage of the method on CUDA with AMP: base → region extraction (detector proposer and
    CLIP on the GPU) → pseudo labels → RKD (uniform, and teacher-aware with the contradiction filter)
    → PIS → RKD+PIS+weight transfer."""
    import json

    import yaml

    from ovd.pipeline import run_pipeline

    gpu = [*FAST, "device=cuda", "solver.amp=true", "solver.max_iter=4", "solver.steps=[3]", "data.num_workers=0"]
    sources = (
        "data.sources=[{dataset: ovshapes_small_train, batch_size: 2, ratio: 1},"
        " {dataset: ovshapes_small_pseudo, supervision: pseudo, batch_size: 4, ratio: 4,"
        " min_size: [96, 128], max_size: 160}]"
    )
    uniform = ["model.distill.region_weighting=uniform", "model.distill.contradiction_iou=0.0"]
    stages = [("base", "base.yaml", []), ("rkd", "rkd.yaml", uniform), ("rkd_conf", "rkd.yaml", [])]  # recipe: aware
    stages += [("pis", "pis.yaml", [sources]), ("wt", "rkd_pis_wt.yaml", [sources])]
    spec = {
        "stages": [
            {"name": n, "config": str(REPO / "configs/ovshapes" / f), "overrides": [*gpu, *extra]}
            for n, f, extra in stages
        ],
        "regions": {"proposals": "base", "k": 4},
        "pseudo_labels": {"dataset": "ovshapes_small_captions", "name": "ovshapes_small_pseudo", "threshold": 0.0},
        "demo_images": 1,
    }
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump(spec))
    result = run_pipeline(pipe, tmp_path / "out")
    names = ["base", "rkd", "rkd_conf", "pis", "wt"]
    assert [r["stage"] for r in result["stages"]] == names
    for name in names:
        state = load_checkpoint(tmp_path / "out" / name / "model_final.pth")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name
        metrics = json.loads((tmp_path / "out" / name / "eval" / "metrics.json").read_text())
        assert 0.0 <= metrics["AP50_all"] <= 100.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_weighted_distill_losses_under_autocast(dtype):
    """The teacher-aware RKD losses in the AMP training step: under autocast on CUDA they stay within
    the dtype's rounding of the float32 CPU values, all-ones weights equal no weights, and the
    gradient reaches the student and not the weights."""
    from ovd.losses import distill_l1_loss, irm_loss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(40, 64, generator=g)
    teacher = torch.randn(40, 64, generator=g)
    weight = torch.rand(40, generator=g)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for loss_fn in (distill_l1_loss, irm_loss):
        ref = loss_fn(student, teacher, weight)
        s = student.cuda().requires_grad_()
        w = weight.cuda().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            out = loss_fn(s @ torch.eye(64, device="cuda"), teacher.cuda(), w)  # a half-precision matmul first
            ones = loss_fn(s @ torch.eye(64, device="cuda"), teacher.cuda(), torch.ones(40, device="cuda"))
            plain = loss_fn(s @ torch.eye(64, device="cuda"), teacher.cuda())
        assert torch.isclose(out.float().cpu(), ref, rtol=tol), (loss_fn.__name__, out, ref)
        assert torch.equal(ones, plain), loss_fn.__name__
        out.backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
        assert w.grad is None  # weights are constants


def test_cuda_batched_extraction_matches_cpu_pil(tmp_path):
    """Batched matrix crops on the GPU give the CPU PIL backend's embeddings."""

    import numpy as np

    from ovd.clip import create_clip
    from ovd.distill import ExtractionCfg, FileProposals, RegionStore, extract_region_embeddings

    records, props = _images_and_proposals(tmp_path, 12, (120, 400), boxes=6, min_side=2, seed=0, png_every=4)
    torch.manual_seed(0)
    cpu_clip = create_clip("ovd-tiny", None)
    gpu_clip = create_clip("ovd-tiny", None, device="cuda")
    gpu_clip.model.load_state_dict(cpu_clip.model.state_dict())
    from ovd.distill.extract import weights_sha256

    assert weights_sha256(gpu_clip.model) == weights_sha256(cpu_clip.model)  # one-copy GPU path, same digest
    opts = ExtractionCfg(batch_size=16, num_workers=2, chunk_size=5)
    ref = RegionStore.open(extract_region_embeddings(records, FileProposals(props), cpu_clip, tmp_path / "cpu", opts))
    out = RegionStore.open(extract_region_embeddings(records, FileProposals(props), gpu_clip, tmp_path / "gpu", opts))
    assert out.metadata["crop_preprocess"]["backend"] == "batched"  # the default on a GPU
    assert out.metadata["crop_preprocess"]["matmul_dtype"] == "float16"  # tensor cores
    for rec in records:
        boxes_ref, emb_ref = ref.lookup(rec.image_id)
        boxes, emb = out.lookup(rec.image_id)
        np.testing.assert_array_equal(boxes, boxes_ref)
        cos = (emb.astype(np.float32) * emb_ref.astype(np.float32)).sum(axis=1)
        assert cos.min() >= 0.99, (rec.file_name, cos.min())


def test_cuda_decode_buffers_give_the_queue_s_bytes(tmp_path):
    """On a GPU the ring of page-locked decode buffers (asynchronous copies on a side stream, slots
    reused ~40 times) gives exactly the bytes of the DataLoader-queue path."""

    import ovd.distill.extract_io as io_mod
    from ovd.clip import create_clip
    from ovd.distill import ExtractionCfg, FileProposals, extract_region_embeddings

    records, props = _images_and_proposals(tmp_path, 240, (200, 480), boxes=5, min_side=8, seed=1)
    torch.manual_seed(0)
    clip = create_clip("ViT-B-32", None, device="cuda")
    made = []
    real_ring = io_mod.HostRing
    opts = ExtractionCfg(batch_size=20, num_workers=2, chunk_size=64)  # 2 images per task, 6 slots
    queue_opts = replace(opts, host_ring=False)
    queue = extract_region_embeddings(records, FileProposals(props), clip, tmp_path / "queue", queue_opts)

    def spy(*args, **kwargs):
        ring = real_ring(*args, **kwargs)
        made.append((ring.num_slots, ring.pinned))
        return ring

    io_mod.HostRing = spy
    try:
        ring = extract_region_embeddings(records, FileProposals(props), clip, tmp_path / "ring", opts)
    finally:
        io_mod.HostRing = real_ring
    assert made == [(6, True)]  # page-locked in place
    for name in ("boxes.npy", "embeddings.npy", "valid.npy", "image_ids.npy"):
        assert (queue / name).read_bytes() == (ring / name).read_bytes(), name


def _images_and_proposals(
    root: Path, n: int, sides: tuple[int, int], *, boxes: int, min_side: float, seed: int, png_every: int = 0
) -> tuple[list[ImageRecord], Path]:
    """``n`` smooth random images (every ``png_every``-th a PNG, the rest JPEGs) with ``boxes`` random
    proposals each in a COCO results file."""
    import json

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    records, results = [], []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(*sides, 2))
        img = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        path = root / f"{i}.{'png' if png_every and i % png_every == 0 else 'jpg'}"
        cv2.imwrite(str(path), img)
        records.append(ImageRecord(image_id=i + 1, file_name=str(path), height=h, width=w))
        for _ in range(boxes):
            bw, bh = rng.uniform(min_side, w), rng.uniform(min_side, h)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            results.append({"image_id": i + 1, "bbox": [x, y, bw, bh], "score": float(rng.random())})
    props = root / "props.json"
    props.write_text(json.dumps(results))
    return records, props
