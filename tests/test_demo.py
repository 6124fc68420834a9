"""The demo: annotated images/videos + detections.json from a tiny checkpoint, drawing, and the CLI's
one-line errors."""

import json
import shutil
from importlib import util
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovd.demo import parse_vocabulary, run_demo
from ovd.errors import OVDError
from ovd.predictor import Prediction, Predictor
from ovd.utils.cli import run_cli
from ovd.visualize import color_for_name, draw_detections

REPO = Path(__file__).parents[1]
CUSTOM = ["star", "moon", "tree"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """A 1-iteration checkpoint and 3 val images (tests/conftest.py)."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint[0], confidence=0.0, device="cpu")  # threshold 0: every image has detections


@pytest.fixture(scope="module")
def images(checkpoint):
    return checkpoint[1]


def _load_tool():
    spec = util.spec_from_file_location("demo_tool", REPO / "tools/demo.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _check_detections(path: Path, vocabulary, num_images: int) -> dict:
    data = json.loads(path.read_text())
    assert set(data) == {"categories", "images", "annotations"}
    assert data["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(vocabulary)]
    assert len(data["images"]) == num_images
    assert [im["id"] for im in data["images"]] == list(range(1, num_images + 1))
    assert data["annotations"]
    for ann in data["annotations"]:
        assert 1 <= ann["image_id"] <= num_images
        assert ann["category_name"] in vocabulary
        assert vocabulary[ann["category_id"] - 1] == ann["category_name"]
        assert len(ann["bbox"]) == 4 and all(isinstance(v, (int, float)) for v in ann["bbox"])
        assert ann["bbox"][2] >= 0 and ann["bbox"][3] >= 0
        assert 0.0 <= ann["score"] <= 1.0
    return data


def test_single_image(predictor, images, tmp_path):
    summary = run_demo(predictor, images[0], tmp_path / "out", progress=False)
    out = tmp_path / "out" / images[0].name
    assert summary["kind"] == "image" and summary["outputs"] == [str(out)]
    source = cv2.imread(str(images[0]))
    annotated = cv2.imread(str(out))
    assert annotated.shape == source.shape and (annotated != source).any()
    data = _check_detections(tmp_path / "out/detections.json", predictor.class_names, 1)
    height, width = source.shape[:2]
    assert data["images"] == [{"id": 1, "file_name": images[0].name, "height": height, "width": width}]
    # the JSON is the predictor's output in COCO xywh: x, y, x2 - x, y2 - y
    pred = predictor(images[0])
    assert summary["num_detections"] == len(pred) == len(data["annotations"])
    first = data["annotations"][0]
    x1, y1, x2, y2 = pred.boxes[0].tolist()
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert first["score"] == pytest.approx(float(pred.scores[0]), abs=1e-5)


def test_folder_sorted_by_name(predictor, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, src in zip(["c.png", "a.png", "b.jpg"], images, strict=True):
        if name.endswith(".png"):
            shutil.copy(src, folder / name)
        else:
            cv2.imwrite(str(folder / name), cv2.imread(str(src)))
    (folder / "notes.txt").write_text("not an image")
    (folder / "d.png").write_bytes(b"corrupt")  # skipped with a warning
    summary = run_demo(predictor, folder, tmp_path / "out", progress=False)
    assert summary["kind"] == "folder" and summary["num_images"] == 3
    assert summary["skipped"] == [str(folder / "d.png")] and not (tmp_path / "out/d.png").exists()
    for name in ["a.png", "b.jpg", "c.png"]:
        assert cv2.imread(str(tmp_path / "out" / name)) is not None
    data = _check_detections(tmp_path / "out/detections.json", predictor.class_names, 3)
    assert [im["file_name"] for im in data["images"]] == ["a.png", "b.jpg", "c.png"]


def test_video(predictor, images, tmp_path):
    frame = cv2.imread(str(images[0]))[:240, :256]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (256, 240))
    assert writer.isOpened()
    for i in range(5):
        writer.write(np.roll(frame, 8 * i, axis=1))
    writer.release()
    summary = run_demo(predictor, video, tmp_path / "out", progress=False)
    out = tmp_path / "out/clip_annotated.mp4"
    assert summary["kind"] == "video" and summary["outputs"] == [str(out)]
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while (ok := cap.read())[0]:
        assert ok[1].shape == (240, 256, 3)
        frames += 1
    cap.release()
    assert frames == 5
    data = _check_detections(tmp_path / "out/detections.json", predictor.class_names, 5)
    assert [im["frame_index"] for im in data["images"]] == [0, 1, 2, 3, 4]
    assert {im["file_name"] for im in data["images"]} == {"clip.mp4"}
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_custom_vocabulary(checkpoint, images, tmp_path):
    predictor = Predictor(checkpoint[0], confidence=0.0, device="cpu")
    predictor.set_vocabulary(CUSTOM)
    run_demo(predictor, images[1], tmp_path, progress=False)
    data = _check_detections(tmp_path / "detections.json", CUSTOM, 1)
    assert {a["category_name"] for a in data["annotations"]} <= set(CUSTOM)


def test_parse_vocabulary():
    assert parse_vocabulary(" star, moon ,,star,") == ["star", "moon"]
    assert parse_vocabulary("circle, square, Circle") == ["circle", "square"]  # merged, with a warning
    assert parse_vocabulary("ovshapes_small_val") == "ovshapes_small_val"
    assert parse_vocabulary("lightning bolt") == ["lightning bolt"]
    assert parse_vocabulary("traffic_light") == ["traffic_light"]
    for empty in [",", " , ,", ""]:
        with pytest.raises(OVDError, match="vocabulary .* is empty"):
            parse_vocabulary(empty)
    with pytest.raises(OVDError, match="unknown dataset 'ovshapes_smal_val'; did you mean 'ovshapes_small_val'"):
        parse_vocabulary("ovshapes_smal_val")


def _prediction(boxes, scores, names):
    n = len(names)
    return Prediction(np.asarray(boxes, np.float32).reshape(n, 4), np.asarray(scores, np.float32), np.zeros(n), names)


def test_draw_detections_changes_only_box_and_label():
    image = np.full((200, 200, 3), 128, np.uint8)
    red = (255, 0, 0)
    out = draw_detections(image, _prediction([[50, 80, 150, 160]], [0.87], ["star"]), palette={"star": red})
    assert (image == 128).all()  # input untouched
    assert out.shape == image.shape and out.dtype == np.uint8
    # the four edges are drawn in the class colour
    for y, x in [(80, 100), (160, 100), (120, 50), (120, 150)]:
        assert tuple(out[y, x]) == red, (y, x)
    # the inside of the box is untouched (the label sits above it)
    assert (out[83:158, 53:148] == 128).all()
    changed = (out != image).any(axis=2)
    ys, xs = np.nonzero(changed)
    # line width 2 (font 10 px / 4, rounded) spills at most 1 px out; the label is < 30 px high above the box
    assert xs.min() >= 49 and xs.max() <= 151 and ys.max() <= 161 and ys.min() >= 80 - 30
    assert changed[60:80, 50:100].mean() > 0.5  # the filled label background above the top-left corner


def test_draw_detections_keeps_labels_inside():
    image = np.zeros((200, 200, 3), np.uint8)
    color = color_for_name("lightning bolt")
    # a box touching the top-right corner: no room above, and the label is wider than the box
    out = draw_detections(image, _prediction([[170, 0, 199, 40]], [0.5], ["lightning bolt"]))
    assert tuple(out[1, 120]) == color  # label background moved left, inside the image, below the top edge
    assert tuple(out[1, 199]) == color
    assert not out[60:, :].any() and not out[:, :100].any()
    # an empty prediction is a plain copy
    assert (draw_detections(image, _prediction([], [], [])) == image).all()


def test_colors_are_stable_per_name():
    assert color_for_name("star") == color_for_name("star") != color_for_name("moon")
    palette = [(1, 2, 3), (4, 5, 6)]
    assert color_for_name("star", palette) in palette
    assert color_for_name("star", {"moon": (9, 9, 9)}) == color_for_name("star")


def test_bad_inputs(predictor, images, tmp_path):
    with pytest.raises(OVDError, match="input not found"):
        run_demo(predictor, tmp_path / "missing.png", tmp_path / "out")
    garbage = tmp_path / "x.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(OVDError, match="x.mp4: cannot open video"):
        run_demo(predictor, garbage, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("hi")
    with pytest.raises(OVDError, match="no images"):
        run_demo(predictor, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(OVDError, match="overwrite the input"):
        run_demo(predictor, images[0], images[0].parent)
    with pytest.raises(OVDError, match="unknown dataset 'no_such_dataset'"):
        predictor.set_vocabulary("no_such_dataset")
    with pytest.raises(OVDError, match="vocabulary: 'Circle' is in the vocabulary twice \\(as 'circle'\\)"):
        predictor.set_vocabulary(["circle", "square", "Circle"])  # would split one class into two columns
    assert not (tmp_path / "out/detections.json").exists()


def test_cli(checkpoint, images, tmp_path, capsys):
    tool = _load_tool()
    ckpt = str(checkpoint[0])
    common = ["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--no-progress"]
    cases = [
        (["--input", str(tmp_path / "nope.png")], "nope.png: input not found"),
        (["--input", str(images[0]), "--vocabulary", ","], "vocabulary ',' is empty"),
        (["--input", str(images[0]), "--vocabulary", "ovshapes_smal_val"], "unknown dataset 'ovshapes_smal_val'"),
        (["--input", str(images[0]), "--checkpoint", str(tmp_path / "no.pth")], "checkpoint not found"),
    ]
    garbage = tmp_path / "x.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    cases.append((["--input", str(garbage)], "x.mp4: cannot open video"))
    for args, message in cases:
        assert run_cli(tool.main, [*common, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    with pytest.raises(SystemExit) as exc:
        tool.main([*common, "--input", str(images[0]), "--confidence", "1.5"])
    assert exc.value.code == 2
    capsys.readouterr()
    args = [*common, "--input", str(images[0]), "--vocabulary", "star, moon", "--confidence", "0"]
    assert run_cli(tool.main, args) == 0
    line = capsys.readouterr().out.strip()
    assert str(tmp_path / "out" / images[0].name) in line and str(tmp_path / "out/detections.json") in line
    _check_detections(tmp_path / "out/detections.json", ["star", "moon"], 1)


def test_camera_index():
    from ovd.demo import camera_index, input_kind

    assert camera_index("webcam") == 0 and camera_index("webcam:3") == 3
    assert camera_index("clip.mp4") is None and camera_index("webcams") is None
    with pytest.raises(OVDError, match="webcam:N"):
        camera_index("webcam:front")
    assert input_kind("webcam:1") == "camera"


class _FakeCamera:
    """cv2.VideoCapture for integer sources: an endless camera of shifted copies of one frame, which
    raises KeyboardInterrupt (Ctrl-C) at read number ``interrupt_at``; other sources use OpenCV."""

    frame: np.ndarray
    interrupt_at: int | None = None
    real = cv2.VideoCapture

    def __new__(cls, source, *args):
        if not isinstance(source, int):
            return cls.real(source, *args)
        return super().__new__(cls)

    def __init__(self, source, *args):
        self.reads = 0

    def isOpened(self):  # noqa: N802 (OpenCV's name)
        return True

    def get(self, prop):
        return 0.0  # cameras report no frame count; no frame rate here either (the default is used)

    def read(self):
        if self.interrupt_at is not None and self.reads == self.interrupt_at:
            raise KeyboardInterrupt
        self.reads += 1
        return True, np.roll(self.frame, 8 * self.reads, axis=1)

    def release(self):
        pass


def test_camera_until_max_frames_or_ctrl_c(predictor, images, tmp_path, monkeypatch):
    _FakeCamera.frame = cv2.imread(str(images[0]))[:240, :256]
    monkeypatch.setattr(cv2, "VideoCapture", _FakeCamera)
    summary = run_demo(predictor, "webcam:1", tmp_path / "a", progress=False, max_frames=3)
    out = tmp_path / "a/webcam1_annotated.mp4"
    assert summary["kind"] == "camera" and summary["num_images"] == 3 and summary["outputs"] == [str(out)]
    data = _check_detections(tmp_path / "a/detections.json", predictor.class_names, 3)
    assert [im["frame_index"] for im in data["images"]] == [0, 1, 2]
    assert {im["file_name"] for im in data["images"]} == {"webcam1"}
    cap = cv2.VideoCapture(str(out))  # a real reader: the file is a valid video of 3 frames
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == 3
    # Ctrl-C during the 5th read: the 4 frames recorded so far are kept, the JSON is written
    monkeypatch.setattr(_FakeCamera, "interrupt_at", 4)
    summary = run_demo(predictor, "webcam", tmp_path / "b", progress=False)
    assert summary["num_images"] == 4 and (tmp_path / "b/webcam0_annotated.mp4").is_file()
    _check_detections(tmp_path / "b/detections.json", predictor.class_names, 4)
    assert not list((tmp_path / "b").glob(".*"))


def test_camera_and_max_frames_errors(predictor, images, tmp_path):
    with pytest.raises(OVDError, match="cannot open camera 57"):
        run_demo(predictor, "webcam:57", tmp_path, progress=False)  # no such device here
    with pytest.raises(OVDError, match="must be >= 1"):
        run_demo(predictor, images[0], tmp_path, progress=False, max_frames=0)


def test_an_error_under_a_progress_bar_starts_on_a_new_line(capsys):
    from tqdm import tqdm

    def main(argv):
        bar = tqdm(total=10, desc="work")  # still drawn when the error comes
        bar.update(3)
        raise OVDError("broken", path="some/file.json")

    assert run_cli(main, []) == 2
    lines = capsys.readouterr().err.split("\n")
    assert lines[-2] == "error: some/file.json: broken" and "work" in lines[-3]
