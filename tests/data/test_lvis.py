"""OV-LVIS data tools: norare split, category info by hand, repeat factors (METHOD §10.12), ImageNet-LVIS."""

from __future__ import annotations

import copy
import json
import math
from importlib import util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ovd.data import catalog
from ovd.data.lvis import (
    category_info,
    imagenet_lvis_json,
    load_lvis_dataset,
    load_lvis_json,
    make_norare,
    read_wnid_mapping,
    register_lvis,
    repeat_factors,
    repeat_indices,
)
from ovd.errors import OVDError
from ovd.structures import ImageRecord

REPO = Path(__file__).resolve().parents[2]

# Three classes, one per frequency group; image 4 has only a rare box, image 5 none at all.
LVIS_TRAIN: dict[str, Any] = {
    "info": {"description": "tiny"},
    "images": [
        {"id": i, "height": 100, "width": 200, "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg"}
        for i in (1, 2, 3, 4, 5)
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [0, 0, 10, 10], "area": 100},  # rare
        {"id": 2, "image_id": 1, "category_id": 20, "bbox": [5, 5, 10, 10], "area": 100},  # common
        {"id": 3, "image_id": 1, "category_id": 20, "bbox": [50, 5, 10, 10], "area": 100},
        {"id": 4, "image_id": 2, "category_id": 30, "bbox": [5, 5, 20, 10], "area": 200},  # frequent
        {"id": 5, "image_id": 3, "category_id": 30, "bbox": [5, 5, 20, 10], "area": 200},
        {"id": 6, "image_id": 3, "category_id": 20, "bbox": [190, 90, 20, 20], "area": 400},  # clipped
        {"id": 7, "image_id": 4, "category_id": 10, "bbox": [1, 1, 2, 2], "area": 4},  # rare
    ],
    "categories": [
        {"id": 10, "name": "aerosol_can", "frequency": "r", "synset": "aerosol.n.02"},
        {"id": 20, "name": "bat_(animal)", "frequency": "c", "synset": "bat.n.01"},
        {"id": 30, "name": "cup", "frequency": "f", "synset": "cup.n.01"},
    ],
}


def test_norare_keeps_every_image_and_no_rare_annotation() -> None:
    original = copy.deepcopy(LVIS_TRAIN)
    norare = make_norare(LVIS_TRAIN)
    assert original == LVIS_TRAIN  # input untouched
    assert norare["images"] == LVIS_TRAIN["images"]  # image 4 (rare only) and 5 (empty) stay
    assert norare["categories"] == LVIS_TRAIN["categories"]  # contiguous ids unchanged
    assert norare["info"] == LVIS_TRAIN["info"]
    assert [a["id"] for a in norare["annotations"]] == [2, 3, 4, 5, 6]
    assert all(a["category_id"] != 10 for a in norare["annotations"])


def test_norare_errors_name_the_field() -> None:
    bad = copy.deepcopy(LVIS_TRAIN)
    del bad["categories"][1]["frequency"]
    with pytest.raises(OVDError, match=r"categories\[1\]\.frequency"):
        make_norare(bad)
    bad = copy.deepcopy(LVIS_TRAIN)
    bad["annotations"][3]["category_id"] = 99
    with pytest.raises(OVDError, match=r"annotations\[3\]\.category_id: category id 99"):
        make_norare(bad, path="x.json")


def test_category_info_counts_by_hand() -> None:
    # full train: 10 -> images {1, 4}, 2 boxes; 20 -> images {1, 3}, 3 boxes; 30 -> images {2, 3}, 2 boxes
    info = category_info(LVIS_TRAIN)
    assert [(c["id"], c["frequency"], c["image_count"], c["instance_count"]) for c in info] == [
        (10, "r", 2, 2),
        (20, "c", 2, 3),
        (30, "f", 2, 2),
    ]
    assert info[1]["name"] == "bat_(animal)"
    # norare: the rare class is counted from the file's own annotations, so it is 0 (no Detic leak)
    norare = category_info(make_norare(LVIS_TRAIN))
    assert [(c["image_count"], c["instance_count"]) for c in norare] == [(0, 0), (2, 3), (2, 2)]
    # COCO-style categories without frequency: the key is left out
    coco = category_info({"categories": [{"id": 1, "name": "a"}], "annotations": []})
    assert coco == [{"id": 1, "name": "a", "image_count": 0, "instance_count": 0}]


def _records(label_sets: list[list[int]]) -> list[ImageRecord]:
    return [
        ImageRecord(
            image_id=i,
            file_name=f"{i}.jpg",
            height=10,
            width=10,
            boxes=np.zeros((len(labels), 4), np.float32),
            labels=np.asarray(labels, np.int64),
        )
        for i, labels in enumerate(label_sets)
    ]


def test_repeat_factors_hand_computed() -> None:
    # 10,000 images: class 0 in 1 image (f = 1e-4), class 1 in 100 (f = 0.01), class 2 in none.
    # r_0 = sqrt(0.001 / 1e-4) = sqrt(10) = 3.162278 (METHOD §10.12), r_1 = max(1, sqrt(0.1)) = 1.
    labels: list[list[int]] = [[] for _ in range(10_000)]
    labels[0] = [0, 1, 1]  # max over its classes: 3.162278
    for i in range(1, 100):
        labels[i] = [1]
    factors = repeat_factors(_records(labels), num_classes=3)
    assert factors.shape == (10_000,) and factors.dtype == np.float64
    assert factors[0] == pytest.approx(math.sqrt(10))
    assert factors[0] == pytest.approx(3.162278, abs=1e-6)
    assert (factors[1:] == 1.0).all()  # f = 0.01 gives 1, and images without boxes get 1


def test_repeat_factors_threshold_and_small_case() -> None:
    # 4 images, t = 1: class 0 in 1 image (f = 1/4 -> r = 2), class 1 in 4 images (f = 1 -> r = 1)
    recs = _records([[0, 1], [1], [1], [1]])
    assert repeat_factors(recs, 2, 1.0).tolist() == [2.0, 1.0, 1.0, 1.0]
    with pytest.raises(OVDError, match="repeat_threshold"):
        repeat_factors(recs, 2, 0.0)
    with pytest.raises(OVDError, match="outside 0..1"):
        repeat_factors(_records([[2]]), 2, 0.001)


def test_repeat_indices_stochastic_rounding() -> None:
    factors = np.array([1.0, 1.5, 2.25, 0.5, 3.162278, 0.0])
    a, b = repeat_indices(factors, seed=7, epoch=3), repeat_indices(factors, seed=7, epoch=3)
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert np.all(np.diff(a) >= 0)
    counts = np.bincount(a, minlength=6)
    assert np.all((counts == np.floor(factors)) | (counts == np.ceil(factors)))  # floor or floor + 1 copies
    assert counts[0] == 1 and counts[5] == 0
    epochs = np.stack([np.bincount(repeat_indices(factors, 7, e), minlength=6) for e in range(4000)])  # (E, I)
    # mean copies = r; the Bernoulli part's std over 4000 epochs is <= 0.5 / sqrt(4000) = 0.008
    assert epochs.mean(axis=0) == pytest.approx(factors, abs=0.04)
    assert not np.array_equal(epochs[0], epochs[1]) or not np.array_equal(epochs[1], epochs[2])
    with pytest.raises(OVDError):
        repeat_indices(np.array([1.0, np.nan]), 0, 0)


def _jpeg(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, "JPEG")


@pytest.fixture
def imagenet_folder(tmp_path: Path) -> Path:
    root = tmp_path / "ImageNet-LVIS"
    _jpeg(root / "n02666196" / "n02666196_2.JPEG", (64, 48))
    _jpeg(root / "n02666196" / "n02666196_1.JPEG", (32, 20))
    _jpeg(root / "n03147509" / "n03147509_9.JPEG", (17, 33))
    (root / "n03147509" / "notes.txt").write_text("not an image")
    return root


def test_imagenet_lvis_json(imagenet_folder: Path) -> None:
    cats = LVIS_TRAIN["categories"]
    out = imagenet_lvis_json(imagenet_folder, {"n02666196": 10, "n03147509": "cup", "n99999999": 20}, cats)
    assert out["annotations"] == []
    assert out["images"] == [
        {"id": 1, "file_name": "n02666196/n02666196_1.JPEG", "width": 32, "height": 20, "pos_category_ids": [10]},
        {"id": 2, "file_name": "n02666196/n02666196_2.JPEG", "width": 64, "height": 48, "pos_category_ids": [10]},
        {"id": 3, "file_name": "n03147509/n03147509_9.JPEG", "width": 17, "height": 33, "pos_category_ids": [30]},
    ]
    assert [(c["id"], c["image_count"]) for c in out["categories"]] == [(10, 2), (20, 0), (30, 1)]
    # the same from a text class list (id, synset and name targets) and from JSON
    text = imagenet_folder.parent / "map.txt"
    text.write_text("# wnid lvis\nn02666196 aerosol.n.02\n\nn03147509 30  # cup\n")
    assert imagenet_lvis_json(imagenet_folder, text, cats) == out
    js = imagenet_folder.parent / "map.json"
    js.write_text(json.dumps({"n02666196": "aerosol_can", "n03147509": 30}))
    assert imagenet_lvis_json(imagenet_folder, js, cats) == out


def test_imagenet_lvis_errors(imagenet_folder: Path) -> None:
    cats = LVIS_TRAIN["categories"]
    with pytest.raises(OVDError, match="not in the wnid mapping: n03147509"):
        imagenet_lvis_json(imagenet_folder, {"n02666196": 10}, cats)
    with pytest.raises(OVDError, match="'teapot' is not an LVIS category"):
        read_wnid_mapping({"n02666196": "teapot"}, cats)
    bare = imagenet_folder.parent / "wnids.txt"
    bare.write_text("n02666196\n")
    with pytest.raises(OVDError, match=r"wnids\.txt: line 1: .*without WordNet"):
        read_wnid_mapping(bare, cats)
    (imagenet_folder / "n03147509" / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(OVDError, match=r"broken\.JPEG: unreadable image"):
        imagenet_lvis_json(imagenet_folder, {"n02666196": 10, "n03147509": 30}, cats)
    with pytest.raises(OVDError, match="image folder not found"):
        imagenet_lvis_json(imagenet_folder / "missing", {}, cats)


def test_load_lvis_json_file_names_from_coco_url(tmp_path: Path) -> None:
    ann = tmp_path / "lvis.json"
    ann.write_text(json.dumps(LVIS_TRAIN))
    records = load_lvis_json(ann, tmp_path / "coco", [10, 20, 30])
    assert [r.image_id for r in records] == [1, 2, 3, 4, 5]  # empty image 5 kept
    assert records[0].file_name == str(tmp_path / "coco" / "train2017" / "000000000001.jpg")
    assert records[0].labels.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(records[2].boxes[1], [190, 90, 200, 100])  # clipped to 200 x 100
    assert len(records[4].boxes) == 0


def test_register_lvis_reads_the_vocabulary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog.ensure_registered()
    for name in ("lvis_v1_train_norare", "lvis_v1_val", "imagenet_lvis", "imagenet_lvis_pseudo"):
        monkeypatch.delitem(catalog._CATALOG, name)  # restored after the test
    monkeypatch.setenv(catalog.DATASETS_ENV, str(tmp_path))
    register_lvis()
    empty = catalog.get_dataset("lvis_v1_val")
    assert empty.num_classes == 0
    with pytest.raises(OVDError, match="prepare_lvis.py norare"):
        load_lvis_dataset(empty)

    # what `tools/prepare_lvis.py norare` writes, run on the tiny train file
    (tmp_path / "lvis").mkdir()
    (tmp_path / "lvis" / "lvis_v1_train.json").write_text(json.dumps(LVIS_TRAIN))
    spec = util.spec_from_file_location("prepare_lvis", REPO / "tools" / "prepare_lvis.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["norare"]) == 0
    norare = json.loads((tmp_path / "lvis" / "lvis_v1_train_norare.json").read_text())
    assert len(norare["images"]) == 5 and len(norare["annotations"]) == 5
    register_lvis()
    info = catalog.get_dataset("lvis_v1_train_norare")
    assert info.class_names == ("aerosol_can", "bat_(animal)", "cup")
    assert info.category_ids == (10, 20, 30)
    assert info.base_classes == (1, 2) and info.novel_classes == (0,)
    assert info.image_root_path == tmp_path / "coco"
    records = load_lvis_dataset(info, with_masks=False)  # the fixture has boxes only
    assert [r.labels.tolist() for r in records] == [[1, 1], [2], [2, 1], [], []]
    assert catalog.get_dataset("imagenet_lvis").ann_type == "image"


def test_prepare_tool_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = util.spec_from_file_location("prepare_lvis", REPO / "tools" / "prepare_lvis.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps({**LVIS_TRAIN, "categories": [{"id": 10, "name": "x"}]}))
    code = tool.run_cli(tool.main, ["norare", "--train", str(bad), "--output", str(tmp_path / "o.json")])
    assert code == 2
    assert f"error: {bad}: categories[0].frequency" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
