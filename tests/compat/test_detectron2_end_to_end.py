"""A converted detectron2 checkpoint used as a user would (issue #19): ``tools/convert_detectron2.py`` on a
file with the released R50-C4's key names (weights from the parity fixtures' shared generator), then
``tools/train_net.py --eval-only`` on a miniature OV-COCO tree, a short training stage that starts from it
through ``init_weights``, and ``tools/demo.py`` with a custom vocabulary.

Tiny settings keep the full-size R50-C4 fast on a CPU: 128-pixel test images, 10 proposals, 8 sampled RoIs.
No CLIP weights exist here, so the text encoder is replaced by a lookup of the real CLIP text embeddings of
COCO's class names (the reference's ``coco_clip_a+photo+cname.npy``, shipped with the parity fixtures).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.compat.detectron2 import class_names
from ovd.engine.checkpoint import load_checkpoint
from ovd.predictor import Predictor
from ovd.utils.cli import run_cli

HERE = Path(__file__).parent
REPO = HERE.parents[1]
ZEROSHOT_COCO = HERE / "data" / "zeroshot_coco.npy"  # (80, 512) float16, COCO id order
TINY = [  # stored in the converted checkpoint (its config), as a user's overrides would be
    "input.min_size_test=128",
    "input.max_size_test=200",
    "model.rpn.pre_nms_top_n_test=300",
    "model.rpn.post_nms_top_n_test=10",
    "data.num_workers=0",
]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(name: str):
    return _module(REPO / "tools" / f"{name}.py", f"tool_{name}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(converted checkpoint, its config yaml, the detectron2 state dict): one conversion for the module."""
    torch.set_num_threads(2)
    parity = _module(HERE / "test_detectron2_parity.py", "d2_parity")
    state, _ = parity.detectron2_state("c4")
    tmp = tmp_path_factory.mktemp("d2_e2e")
    d2_file, out = tmp / "model_final.pth", tmp / "coco_ovd_base_ovd.pth"
    torch.save({"model": state, "iteration": 90000, "optimizer": {}, "__author__": "detectron2"}, d2_file)
    assert run_cli(_tool("convert_detectron2").main, ["--input", str(d2_file), "--output", str(out), *TINY]) == 0
    return out, out.with_suffix(".yaml"), state


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2_e2e_data") / "datasets"
    _module(REPO / "tests" / "realformat.py", "realformat").build_ov_coco(root)
    return root


@pytest.fixture
def clip_lookup(monkeypatch):
    """The CLIP text encoder replaced by the real embeddings of COCO's class names (no weights here)."""
    import ovd.clip

    table = dict(zip(class_names("coco"), np.load(ZEROSHOT_COCO).astype(np.float32), strict=True))

    def lookup(_clip, names, templates=(), **_):
        return torch.nn.functional.normalize(torch.from_numpy(np.stack([table[n] for n in names])), dim=1)

    monkeypatch.setattr(ovd.clip, "create_clip", lambda *a, **k: None)
    monkeypatch.setattr(ovd.clip, "build_text_embeddings", lookup)


def test_eval_only_on_ov_coco(converted, coco_tree, tmp_path, monkeypatch, capsys):
    """``--eval-only --weights converted.pth`` with the converted file's own config writes metrics.json."""
    ckpt, yaml, _ = converted
    monkeypatch.setenv("OVD_DATASETS", str(coco_tree))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval"
    argv = ["--config-file", str(yaml), "--eval-only", "--weights", str(ckpt), "--output-dir", str(out)]
    assert run_cli(_tool("train_net").main, argv) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out)["AP50_all"] == metrics["AP50_all"]  # the printed summary
    for key in ("AP50_novel", "AP50_base", "AP50_all", "AP"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert not (out / "text_embeddings").exists()  # the checkpoint's vocabulary: no text encoder was needed
    # the evaluated detections are the converted model's: those of its busiest image equal the Predictor's
    from ovd.data.catalog import get_dataset

    info = get_dataset("coco_ovd_val")
    dets = json.loads((out / "eval" / "detections.json").read_text())
    assert dets
    busiest = max({d["image_id"] for d in dets}, key=lambda i: sum(d["image_id"] == i for d in dets))
    image = next(im for im in json.loads(info.ann_file_path.read_text())["images"] if im["id"] == busiest)
    ours = Predictor(ckpt, confidence=0.05, device="cpu")(str(info.image_root_path / image["file_name"]))
    want = sorted(d["score"] for d in dets if d["image_id"] == busiest)
    assert np.allclose(sorted(ours.scores.tolist()), want, atol=1e-5, rtol=0)


def test_training_starts_from_the_converted_weights(converted, coco_tree, tmp_path, monkeypatch):
    """A short base-stage run with ``init_weights`` = the converted file: frozen layers keep its values
    exactly, trained ones move from them (not from a fresh initialisation)."""
    ckpt, yaml, d2_state = converted
    monkeypatch.setenv("OVD_DATASETS", str(coco_tree))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "train"
    overrides = [
        f"init_weights={ckpt}",
        f"clip.embeddings={ZEROSHOT_COCO}",  # the reference's embeddings of the 80 names: no text encoder
        "data.train=coco_ovd_train",
        "data.test=",
        "solver.max_iter=2",
        "solver.ims_per_batch=1",
        "solver.warmup_iters=0",
        "solver.base_lr=0.001",
        "solver.checkpoint_period=2",
        "input.min_size_train=[128]",
        "input.max_size_train=200",
        "model.rpn.pre_nms_top_n_train=300",
        "model.rpn.post_nms_top_n_train=32",
        "model.roi_heads.batch_size_per_image=8",
    ]
    # with the pre-flight check: clip.embeddings set, so it must not read CLIP weights (none exist here)
    argv = ["--config-file", str(yaml), "--output-dir", str(out), *overrides]
    assert run_cli(_tool("train_net").main, argv) == 0
    start = load_checkpoint(ckpt)["model"]
    final = load_checkpoint(out / "model_final.pth")["model"]
    assert final.keys() == start.keys()
    frozen = [k for k in start if k.startswith(("backbone.stem.", "backbone.layer1."))]
    assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)  # freeze_at=2: stem + res2 as loaded
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(final[k], start[k])]
    assert any(k.startswith("roi_heads.") for k in moved)
    # ... and only a little: two SGD steps at lr 1e-3 from the converted weights
    assert all(float((final[k] - start[k]).abs().max()) < 0.05 for k in moved)


def test_demo_with_a_custom_vocabulary(converted, clip_lookup, tmp_path, capsys):
    """``tools/demo.py --vocabulary`` on a photo: the detections of a sub-vocabulary are the full model's
    detections of those classes (sigmoid scores are per class; NMS is per class)."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    ckpt, _, _ = converted
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(photo)
    full = Predictor(ckpt, confidence=0.05, device="cpu")(str(photo))
    assert len(full) > 0
    names = full.names
    custom = sorted(set(names[:2])) + ["giraffe" if "giraffe" not in names else "zebra"]
    argv = ["--checkpoint", str(ckpt), "--input", str(photo), "--output", str(tmp_path / "out")]
    argv += ["--vocabulary", ", ".join(custom), "--confidence", "0.05", "--device", "cpu", "--no-progress"]
    assert run_cli(_tool("demo").main, argv) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "out" / "detections.json").read_text())
    got = sorted((a["category_name"], a["score"]) for a in data["annotations"])
    want = sorted((n, float(s)) for n, s in zip(names, full.scores, strict=True) if n in custom)
    assert [n for n, _ in got] == [n for n, _ in want] and got
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5, rtol=0)
