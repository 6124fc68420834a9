"""ONNX export: the exported graph gives PyTorch's detections at image sizes it was not traced with (padding
included), an empty result when nothing passes the threshold, its metadata, the runner, the CLI, and
clear errors."""

import json
import os
import shutil
from importlib import util
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.errors import OVDError
from ovd.predictor import Prediction, Predictor
from ovd.utils.cli import run_cli

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from ovd.export import (  # noqa: E402  (after the skips)
    ExportableDetector,
    OnnxDetector,
    batched_nms_for_export,
    check_export,
    export_onnx,
    matched_detections,
    read_metadata,
)

REPO = Path(__file__).parents[1]
CUSTOM = ["star", "moon", "tree", "bell"]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a custom vocabulary and threshold 0 (every image has detections),
    exported with a 96 x 128 example."""
    predictor = Predictor(tiny_checkpoint[0], confidence=0.0, device="cpu")
    predictor.set_vocabulary(CUSTOM)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    cfg = predictor.cfg.input
    export_onnx(predictor.model, path, class_names=predictor.class_names, min_size_test=cfg.min_size_test,
                max_size_test=cfg.max_size_test, example_size=(96, 128), size_range=(32, 1024))  # fmt: skip
    return predictor, path


def _as_prediction(boxes, scores, labels) -> Prediction:
    boxes, scores, labels = (np.asarray(v) for v in (boxes, scores, labels))
    return Prediction(boxes.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64), [""] * len(labels))


def test_graph_matches_pytorch_at_other_sizes(exported):
    predictor, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    wrapper = ExportableDetector(predictor.model)
    rng = np.random.default_rng(1)
    # the traced size, sizes that need padding to the size divisibility, portrait and landscape, a large one
    for size in [(96, 128), (64, 64), (70, 90), (130, 61), (300, 401)]:
        image = rng.integers(0, 256, (3, *size), dtype=np.uint8)
        boxes, scores, labels = session.run(None, {"image": image})
        with torch.no_grad():
            ref = _as_prediction(*(t.numpy() for t in wrapper(torch.from_numpy(image))))
        got = _as_prediction(boxes, scores, labels)
        assert len(ref) > 0 and len(got) == len(ref), size
        assert matched_detections(ref, got) == len(ref), size  # same label, score and box for every detection
        assert (boxes[:, 2] <= size[1] + 1e-3).all() and (boxes[:, 3] <= size[0] + 1e-3).all()  # clipped to the image


def test_runner_and_metadata(exported, tiny_checkpoint):
    predictor, path = exported
    meta = read_metadata(path)
    assert json.loads(meta["class_names"]) == CUSTOM
    assert (meta["min_size_test"], meta["max_size_test"]) == ("64", str(predictor.cfg.input.max_size_test))
    assert float(meta["score_thresh_test"]) == 0.0 and json.loads(meta["outputs"]) == ["boxes", "scores", "labels"]
    runner = OnnxDetector(path)
    for image in tiny_checkpoint[1]:  # real val images, resized to the test scale by both
        ref, got = predictor(image), runner(image)
        assert len(ref) > 0 and len(got) == len(ref) and matched_detections(ref, got) == len(ref)
        assert got.names == [CUSTOM[i] for i in got.labels]
    strict = OnnxDetector(path, confidence=0.5)(tiny_checkpoint[1][0])
    assert (strict.scores >= 0.5).all() and len(strict) <= len(runner(tiny_checkpoint[1][0]))
    report = check_export(predictor, path, size=(50, 75))
    assert report["torch"] == report["onnx"] == report["matched"] > 0


def test_nothing_above_the_threshold_gives_empty_outputs(tiny_checkpoint, tmp_path):
    predictor = Predictor(tiny_checkpoint[0], confidence=1.0, device="cpu")  # scores are never > 1
    cfg = predictor.cfg.input
    path = export_onnx(
        predictor.model, tmp_path / "empty.onnx", class_names=predictor.class_names,
        min_size_test=cfg.min_size_test, max_size_test=cfg.max_size_test, example_size=(96, 128),
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": np.zeros((3, 72, 100), dtype=np.uint8)})
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,) and labels.dtype == np.int64
    assert len(OnnxDetector(path)(tiny_checkpoint[1][0])) == 0


def test_batched_nms_for_export_equals_torchvision():
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 200):
        xy = torch.from_numpy(rng.uniform(0, 50, (n, 2))).float()
        boxes = torch.cat([xy, xy + torch.from_numpy(rng.uniform(1, 30, (n, 2))).float()], dim=1)  # (n, 4)
        scores = torch.from_numpy(rng.permutation(n)).float()  # distinct: no ties
        idxs = torch.from_numpy(rng.integers(0, 3, n))
        got = batched_nms_for_export(boxes, scores, idxs, 0.5)
        assert got.dtype == torch.int64 and torch.equal(got, batched_nms(boxes, scores, idxs, 0.5)), n


def test_errors(exported, tmp_path):
    predictor, path = exported
    cfg = predictor.cfg.input
    with pytest.raises(OVDError, match="3 class names for a vocabulary of 4 classes"):
        export_onnx(predictor.model, tmp_path / "x.onnx", class_names=CUSTOM[:3], min_size_test=64, max_size_test=64)
    with pytest.raises(OVDError, match=r"example size \(16, 16\) must lie within the size range"):
        export_onnx(predictor.model, tmp_path / "x.onnx", class_names=CUSTOM, min_size_test=cfg.min_size_test,
                    max_size_test=cfg.max_size_test, example_size=(16, 16))  # fmt: skip
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(OVDError, match="no such ONNX file") as info:
        OnnxDetector(tmp_path / "missing.onnx")
    assert info.value.path == str(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\x00")
    with pytest.raises(OVDError, match="junk.onnx: not an ONNX model"):
        read_metadata(tmp_path / "junk.onnx")
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(OVDError, match=r"plain.onnx: not exported by ovd: metadata \['class_names'"):
        OnnxDetector(tmp_path / "plain.onnx")
    with pytest.raises(OVDError, match="expected an RGB uint8"):
        OnnxDetector(path)(np.zeros((10, 10), dtype=np.uint8))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("class_names", "not json", "ovd.class_names: malformed metadata: expected a JSON list of strings"),
        ("class_names", '["a", 3]', "ovd.class_names: malformed metadata: expected a JSON list of strings"),
        ("class_names", "[]", "ovd.class_names: malformed metadata: expected at least one class name"),
        ("outputs", '["boxes"]', "ovd.outputs: malformed metadata: expected a list holding boxes, scores, labels"),
        ("min_size_test", "sixty", "ovd.min_size_test: malformed metadata: expected a positive integer"),
        ("max_size_test", "-5", "ovd.max_size_test: malformed metadata: expected a positive integer"),
    ],
)
def test_malformed_metadata_is_one_error(exported, tmp_path, key, value, match):
    import onnx

    proto = onnx.load(str(exported[1]))
    for entry in proto.metadata_props:
        if entry.key == f"ovd.{key}":
            entry.value = value
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(OVDError, match=match) as e:
        OnnxDetector(tmp_path / "bad.onnx")
    assert e.value.path == str(tmp_path / "bad.onnx")


def test_labels_outside_the_vocabulary_are_an_error(exported, tiny_checkpoint, tmp_path):
    import onnx

    proto = onnx.load(str(exported[1]))
    for entry in proto.metadata_props:
        if entry.key == "ovd.class_names":
            entry.value = json.dumps(CUSTOM[:1])  # one name for a 4-class graph: labels 1..3 have no name
    onnx.save(proto, str(tmp_path / "short.onnx"))
    runner = OnnxDetector(tmp_path / "short.onnx")
    assert (OnnxDetector(exported[1])(tiny_checkpoint[1][0]).labels > 0).any()  # the graph does return them
    with pytest.raises(OVDError, match=r"short.onnx: the model returned label [1-3] for a vocabulary of 1 classes"):
        runner(tiny_checkpoint[1][0])


def test_export_writes_through_a_unique_temporary_file(exported, tmp_path, monkeypatch):
    predictor, done = exported
    cfg = predictor.cfg.input

    class Program:  # the graph exported once by the fixture: only the writing is under test here
        def save(self, path):
            shutil.copyfile(done, path)

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    (tmp_path / ".model.onnx.tmp").write_text("another export's temporary file")  # the old fixed name
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    export_onnx(predictor.model, tmp_path / "model.onnx", class_names=CUSTOM, min_size_test=cfg.min_size_test,
                max_size_test=cfg.max_size_test, example_size=(96, 128))  # fmt: skip
    assert (tmp_path / ".model.onnx.tmp").read_text() == "another export's temporary file"
    assert seen and seen[-1] != ".model.onnx.tmp" and seen[-1].startswith(".model.")
    assert read_metadata(tmp_path / "model.onnx")["class_names"] == json.dumps(CUSTOM)


def test_cli(tiny_checkpoint, tmp_path, capsys):
    spec = util.spec_from_file_location("export_tool", REPO / "tools/export_onnx.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "cli" / "model.onnx"
    argv = ["--checkpoint", str(tiny_checkpoint[0]), "--vocabulary", "star, moon", "--output", str(out),
            "--confidence", "0", "--example-size", "96", "128"]  # fmt: skip
    assert run_cli(tool.main, argv) == 0
    printed = capsys.readouterr().out
    assert f"exported 2 classes → {out}" in printed and "detections identical" in printed
    assert json.loads(read_metadata(out)["class_names"]) == ["star", "moon"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary file left
    assert run_cli(tool.main, ["--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    # the demo runs the exported file: annotated images + detections.json with its vocabulary
    spec = util.spec_from_file_location("demo_tool", REPO / "tools/demo.py")
    demo = util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    images = tiny_checkpoint[1]
    (tmp_path / "in").mkdir()
    for image in images:
        shutil.copy(image, tmp_path / "in" / image.name)
    argv = ["--onnx", str(out), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "demo"),
            "--confidence", "0", "--no-progress"]  # fmt: skip
    assert run_cli(demo.main, argv) == 0
    coco = json.loads((tmp_path / "demo/detections.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["star", "moon"] and len(coco["annotations"]) > 0
    assert all((tmp_path / "demo" / p.name).is_file() for p in images)
    capsys.readouterr()
    assert run_cli(demo.main, [*argv[:6], "--vocabulary", "cat"]) == 2  # the vocabulary is baked in
    assert "--vocabulary: an exported model detects the vocabulary it was exported with" in capsys.readouterr().err


def test_mask_rcnn_export_gives_the_masks(tmp_path):
    """A Mask R-CNN (the long-tailed OV-Shapes recipe, random weights, threshold 0) exports a fourth
    output, the per-box mask probabilities, equal to PyTorch's at another size."""
    from ovd.config import load_config
    from ovd.modeling.build import build_model

    cfg = load_config(REPO / "configs/ovshapes_lt/base.yaml", ["model.roi_heads.score_thresh_test=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(5, 64))  # ovd-tiny CLIP width.eval()
    path = export_onnx(model, tmp_path / "mask.onnx", class_names=list("abcde"), min_size_test=64,
                       max_size_test=128, example_size=(96, 128))  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels", "masks"]
    image = np.random.default_rng(2).integers(0, 256, (3, 70, 90), dtype=np.uint8)
    got = session.run(None, {"image": image})
    with torch.no_grad():
        ref = [t.numpy() for t in ExportableDetector(model)(torch.from_numpy(image))]
    assert len(ref[0]) > 0 and got[3].shape == ref[3].shape and got[3].shape[1:] == (1, 28, 28)
    pred_ref, pred_got = _as_prediction(*ref[:3]), _as_prediction(*got[:3])
    assert matched_detections(pred_ref, pred_got) == len(ref[0])
    np.testing.assert_array_equal(got[2], ref[2])  # same order here (no score ties), so masks compare row by row
    np.testing.assert_allclose(got[3], ref[3], atol=1e-4)


def test_weight_transfer_model_exports(tmp_path):
    """The method's last stage (RKD+PIS+weight transfer: its classifier is fc1-fc4 + a residual MLP)
    exports and gives PyTorch's detections."""
    from ovd.config import load_config
    from ovd.modeling.build import build_model

    cfg = load_config(REPO / "configs/ovshapes/rkd_pis_wt.yaml", ["model.roi_heads.score_thresh_test=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(16, 64)).eval()
    assert type(model.roi_heads.classifier).__name__ == "WeightTransferClassifier"
    path = export_onnx(model, tmp_path / "wt.onnx", class_names=[f"c{i}" for i in range(16)], min_size_test=256,
                       max_size_test=400, example_size=(96, 128))  # fmt: skip
    image = np.random.default_rng(3).integers(0, 256, (3, 150, 200), dtype=np.uint8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})
    with torch.no_grad():
        ref = [t.numpy() for t in ExportableDetector(model)(torch.from_numpy(image))]
    assert len(ref[0]) > 0 and matched_detections(_as_prediction(*ref), _as_prediction(*got)) == len(ref[0])
