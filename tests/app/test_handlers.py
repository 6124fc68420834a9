"""The web demo's handlers without a browser: the same detections as Predictor, the drawing of
tools/demo.py, COCO-results JSON, the embedding cache, models loaded once, and bad inputs as messages."""

import json
from importlib import util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ovd.app.handlers import OWN_CLASSES_PRESET, DemoHandlers
from ovd.app.inputs import MAX_VOCABULARY_NAMES, load_image, parse_names
from ovd.app.models import ModelZoo, discover_checkpoints, model_sources
from ovd.data.catalog import get_dataset
from ovd.data.loader import read_image_rgb
from ovd.errors import OVDError
from ovd.utils.cli import run_cli
from ovd.visualize import draw_detections

REPO = Path(__file__).parents[2]
NAMES = ["star", "moon", "tree"]
VOCABULARY = "star, moon, tree"


@pytest.fixture(scope="module")
def handlers(tiny_checkpoint, clip_file, tmp_path_factory):
    checkpoint = tiny_checkpoint[0]
    zoo = ModelZoo(model_sources([checkpoint, checkpoint]), clip_pretrained=clip_file)  # two names, one file
    return DemoHandlers(zoo, tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def image(tiny_checkpoint):
    return tiny_checkpoint[1][0]


def test_run_equals_predictor_and_draws_like_demo(handlers, image, reference, assert_same_detections):
    model = handlers.zoo.names[0]
    run_id, loaded, [result] = handlers.run(image, VOCABULARY, 0.05, model)
    want = reference(image, NAMES, 0.05)
    assert_same_detections(result.prediction, want)
    assert not loaded.reduced and loaded.rgb.shape == read_image_rgb(str(image)).shape
    # the drawing of tools/demo.py, pixel for pixel
    np.testing.assert_array_equal(result.annotated, draw_detections(read_image_rgb(str(image)), want))
    np.testing.assert_array_equal(read_image_rgb(str(result.image_path)), result.annotated)  # the PNG the page shows
    # table: by decreasing score, rounded as detections.json
    top = int(np.argmax(want.scores))
    assert result.rows[0] == [want.names[top], round(float(want.scores[top]), 5), *np.round(want.boxes[top], 2)]
    assert [r[1] for r in result.rows] == sorted((r[1] for r in result.rows), reverse=True)
    # COCO results: xywh = (x1, y1, x2 - x1, y2 - y1), category id = vocabulary index + 1
    data = json.loads(result.json_path.read_text())
    assert data["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    assert data["images"][0]["file_name"] == image.name and len(data["annotations"]) == len(want)
    ann = data["annotations"][0]
    x1, y1, x2, y2 = want.boxes[0].tolist()
    assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert ann["category_id"] == int(want.labels[0]) + 1 and ann["category_name"] == want.names[0]
    assert run_id >= 1 and f"{len(want)} detections" in result.summary()


def test_own_classes_use_the_checkpoints_embeddings(handlers, image, reference, assert_same_detections):
    model = handlers.zoo.names[0]
    own = handlers.zoo.own_classes(model)
    handlers.run(image, VOCABULARY, 0.05, model)  # switch away, then back
    _, _, [result] = handlers.run(image, handlers.preset_text(OWN_CLASSES_PRESET, model), 0.05, model)
    # a fresh Predictor keeps the stored embeddings; re-encoding the names would give other ones
    assert_same_detections(result.prediction, reference(image, None, 0.05))
    assert result.cached and result.prediction.names[0] in own


def test_confidence_threshold(handlers, image, reference, assert_same_detections):
    model = handlers.zoo.names[0]
    _, _, [low] = handlers.run(image, VOCABULARY, 0.0, model)
    threshold = float(np.median(low.prediction.scores))
    _, _, [high] = handlers.run(image, VOCABULARY, threshold, model)
    assert 0 < len(high.prediction) < len(low.prediction)
    assert (high.prediction.scores > threshold).all()
    assert_same_detections(high.prediction, reference(image, NAMES, threshold))


def test_models_load_once_and_embeddings_are_cached(handlers, image):
    zoo = handlers.zoo
    first, second = zoo.names
    handlers.run(image, VOCABULARY, 0.3, first, second)
    loads, builds = zoo.loads, zoo.embedding_builds
    _, _, results = handlers.run(image, "cat, dog", 0.3, first, second)
    assert [r.cached for r in results] == [False, False]  # new (model, vocabulary) pairs
    assert zoo.embedding_builds == builds + 2
    _, _, results = handlers.run(image, "cat ,dog", 0.3, first, second)  # the same names
    assert [r.cached for r in results] == [True, True] and zoo.embedding_builds == builds + 2
    _, _, results = handlers.run(image, VOCABULARY, 0.3, first, second)  # back: cached, not re-encoded
    assert [r.cached for r in results] == [True, True] and zoo.embedding_builds == builds + 2
    assert zoo.loads == loads == 2
    assert "embeddings cached" in results[0].summary()


def test_compare_two_models(handlers, image, assert_same_detections):
    first, second = handlers.zoo.names
    _, _, (a, b) = handlers.run(image, VOCABULARY, 0.05, first, second)
    assert (a.model, b.model) == (first, second) and a.json_path != b.json_path
    assert_same_detections(a.prediction, b.prediction)  # the same checkpoint under two names
    np.testing.assert_array_equal(a.annotated, b.annotated)
    _, _, results = handlers.run(image, VOCABULARY, 0.05, first, first)
    assert len(results) == 1


def test_presets(handlers):
    model = handlers.zoo.names[0]
    presets = handlers.presets()
    assert presets[0] == OWN_CLASSES_PRESET and {"coco_ovd_val", "ovshapes_val"} <= set(presets)
    assert parse_names(handlers.preset_text(OWN_CLASSES_PRESET, model)) == handlers.zoo.own_classes(model)
    for dataset in ("coco_ovd_val", "ovshapes_val"):
        names = parse_names(handlers.preset_text(dataset, model))
        assert names == list(get_dataset(dataset, prepare=False).class_names)
    assert parse_names(handlers.preset_text("coco_ovd_val", model))[:3] == ["person", "bicycle", "car"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the vocabulary is empty"),
        (" , ,\n", "the vocabulary is empty"),
        ("star, moon, Star , moon", "repeated class names: star, moon"),
        (", ".join(f"class {i}" for i in range(2000)), "2,000 class names is too many"),
        ("x" * 201, "longer than 200 characters"),
    ],
)
def test_bad_vocabulary_is_one_message(handlers, image, text, message):
    with pytest.raises(OVDError, match=message):
        handlers.run(image, text, 0.3, handlers.zoo.names[0])


def test_vocabulary_parsing():
    assert parse_names(" star,moon ;tree\n key ") == ["star", "moon", "tree", "key"]
    names = [f"class {i}" for i in range(MAX_VOCABULARY_NAMES)]
    assert parse_names(", ".join(names)) == names  # LVIS's 1,203 classes fit


def test_bad_images_are_one_message(handlers, image, tmp_path, huge_png):
    model = handlers.zoo.names[0]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:200])
    cases = [
        (None, "no image"),
        (text, "notes.png: not an image file"),
        (truncated, "truncated.png: cannot decode the image"),
        (huge_png, r"huge.png: the image is 12000x12000 \(144 Mpx\): larger than 40 Mpx"),
    ]
    for path, message in cases:
        with pytest.raises(OVDError, match=message):
            handlers.run(path, VOCABULARY, 0.3, model)
    with pytest.raises(OVDError, match="unknown model 'nope'"):
        handlers.run(image, VOCABULARY, 0.3, "nope")
    _, _, [result] = handlers.run(image, VOCABULARY, 0.3, model)  # still serving
    assert len(result.prediction) > 0


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_huge_jpeg_is_reduced_within_a_memory_bound(handlers, tmp_path):
    side = 12000
    path = tmp_path / "huge.jpg"
    picture = Image.new("L", (side, side), 100)
    ImageDraw.Draw(picture).rectangle([3000, 3000, 8999, 5999], fill=220)
    picture.save(path, quality=50)
    del picture
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux)
        before = _peak_rss_mb()
    except OSError:
        pytest.skip("no /proc/self/clear_refs: cannot measure the peak memory")
    loaded = load_image(path)
    grown = _peak_rss_mb() - before
    full = side * side * 3 / 2**20  # 412 MiB: the full image decoded as RGB
    assert grown < full, f"decoding took {grown:.0f} MiB, more than the full image ({full:.0f} MiB)"
    # decoded at 1/2 (6000 px: 36 Mpx <= 40), then reduced to 4096 px
    assert loaded.rgb.shape == (4096, 4096, 3) and loaded.original_size == (side, side)
    assert loaded.scale == pytest.approx(4096 / side)
    assert tuple(loaded.rgb[1536, 2048]) == (220, 220, 220) and tuple(loaded.rgb[100, 100]) == (100, 100, 100)
    # boxes come back in the file's pixels: the model's boxes x 12000 / 4096
    model = handlers.zoo.names[0]
    _, _, [result] = handlers.run(path, VOCABULARY, 0.3, model)
    direct, _, _ = handlers.zoo.detect(model, loaded.rgb, NAMES, 0.3)
    np.testing.assert_allclose(result.prediction.boxes, direct.boxes * side / 4096, rtol=1e-5)
    assert json.loads(result.json_path.read_text())["images"][0]["height"] == side


def test_model_sources_and_discovery(tmp_path, tiny_checkpoint):
    runs = tmp_path / "output/ovshapes"
    for stage in ("rkd", "base"):
        (runs / stage).mkdir(parents=True)
        (runs / stage / "model_final.pth").write_bytes(b"x")
    found = discover_checkpoints(root=tmp_path)  # no evaluation recorded: by path
    assert found == [
        tmp_path / "output/ovshapes/base/model_final.pth",
        tmp_path / "output/ovshapes/rkd/model_final.pth",
    ]
    # the best recorded run comes first (the page's default model); a broken metrics.json counts as none
    for stage, text in (
        ("rkd", '{"AP50_all": 66.9}'),
        ("base", '{"AP50_all": 38.7}'),
        ("lvis", '{"bbox": {"AP": 70}}'),
    ):
        (runs / stage / "eval").mkdir(parents=True, exist_ok=True)
        (runs / stage / "eval" / "metrics.json").write_text(text)
    (runs / "lvis" / "model_final.pth").write_bytes(b"x")
    (runs / "broken" / "eval").mkdir(parents=True)
    (runs / "broken" / "eval" / "metrics.json").write_text("{not json")
    (runs / "broken" / "model_final.pth").write_bytes(b"x")
    ranked = [p.parent.name for p in discover_checkpoints(root=tmp_path)]
    assert ranked == ["lvis", "rkd", "base", "broken"]
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    sources = model_sources([*found, found[0]], [onnx])
    assert [s.name for s in sources] == ["base", "rkd", "base #2", "m (onnx)"]
    assert [s.kind for s in sources] == ["checkpoint"] * 3 + ["onnx"]
    with pytest.raises(OVDError, match="checkpoint not found"):
        model_sources([tmp_path / "missing.pth"])
    with pytest.raises(OVDError, match="no model to serve"):
        model_sources([])


def test_tool_defaults_and_errors(tmp_path, monkeypatch, capsys):
    spec = util.spec_from_file_location("web_demo_tool", REPO / "tools/web_demo.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args([])
    assert (args.host, args.port, args.checkpoint, args.onnx) == ("127.0.0.1", 7860, [], [])
    monkeypatch.chdir(tmp_path)  # no output/ovshapes here
    assert run_cli(tool.main, []) == 2
    assert "no checkpoint matches output/ovshapes/*/model_final.pth" in capsys.readouterr().err
    assert run_cli(tool.main, ["--checkpoint", "missing.pth"]) == 2
    assert "missing.pth: checkpoint not found" in capsys.readouterr().err


def test_loopback_guard_refuses_outside_connections():
    """The browser tests' offline check (ovd.app.browser.loopback_only) can fail: it sees attempts."""
    import socket

    from ovd.app.browser import loopback_only

    with loopback_only() as attempts, socket.socket() as s:
        s.settimeout(0.1)
        with pytest.raises(OSError, match="no network"):
            s.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo("example.com", 443)
    assert attempts == ["('192.0.2.1', 80)", "example.com"]


def test_an_exported_model_detects_its_own_classes(monkeypatch, tiny_checkpoint, clip_file, tmp_path, image):
    """An ONNX model beside a checkpoint: its own vocabulary and the slider's threshold. Exporting takes
    a minute here, so OnnxDetector is stood in for by a Predictor with its interface (class_names, a
    ``confidence`` attribute applied to the scores; tests/test_export.py checks OnnxDetector itself)."""
    import ovd.export
    from ovd.predictor import Predictor

    checkpoint = tiny_checkpoint[0]

    class ExportedStandIn:
        def __init__(self, path) -> None:
            self.predictor = Predictor(checkpoint, confidence=0.0, device="cpu")
            self.class_names = list(self.predictor.class_names)
            self.confidence = 0.0

        def __call__(self, array):
            prediction = self.predictor(array)
            keep = prediction.scores >= self.confidence
            names = [n for n, k in zip(prediction.names, keep, strict=True) if k]
            return type(prediction)(prediction.boxes[keep], prediction.scores[keep], prediction.labels[keep], names)

    monkeypatch.setattr(ovd.export, "OnnxDetector", ExportedStandIn)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"stand-in")
    zoo = ModelZoo(model_sources([checkpoint], [onnx]), clip_pretrained=clip_file)
    handlers = DemoHandlers(zoo, tmp_path / "web")
    name, exported = zoo.names
    assert exported == "model (onnx)" and zoo.is_fixed_vocabulary(exported) and not zoo.is_fixed_vocabulary(name)
    own = zoo.own_classes(exported)
    _, _, (a, b) = handlers.run(image, VOCABULARY, 0.5, name, exported)
    assert set(a.prediction.names) <= set(NAMES) and set(b.prediction.names) <= set(own)
    assert (b.prediction.scores >= 0.5).all() and "exported: its own classes" in b.summary()
    assert [c["name"] for c in json.loads(b.json_path.read_text())["categories"]] == own
    # alone, it needs no vocabulary: an empty box is fine
    _, _, [alone] = handlers.run(image, "", 0.5, exported)
    np.testing.assert_array_equal(alone.prediction.boxes, b.prediction.boxes)
    with pytest.raises(OVDError, match="detects only its own classes"):
        zoo.detect(exported, read_image_rgb(str(image)), NAMES, 0.5)


def test_concurrent_runs_do_not_mix_vocabularies(handlers, image):
    """Two users at once on one model with different vocabularies: each gets its own detections (the
    zoo switches vocabulary and threshold and detects under one lock)."""
    from concurrent.futures import ThreadPoolExecutor

    model = handlers.zoo.names[0]
    jobs = [("star, moon, tree", 0.05), ("cat, dog", 0.3)] * 4
    alone = {job: handlers.run(image, *job, model)[2][0].prediction for job in set(jobs)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda job: handlers.run(image, *job, model)[2][0].prediction, jobs))
    for job, got in zip(jobs, together, strict=True):
        assert got.names == alone[job].names
        np.testing.assert_array_equal(got.boxes, alone[job].boxes)
