"""The PIS command-line tools: tag_captions.py and generate_pseudo_labels.py (exit codes, outputs)."""

import json
from importlib import util
from pathlib import Path

import pytest

from ovd.utils.cli import run_cli

REPO = Path(__file__).parents[2]


def _tool(name: str):
    spec = util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path_factory.getbasetemp() / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tag_captions_for_a_dataset_and_coco_synonyms(tmp_path, capsys):
    tool = _tool("tag_captions")
    out = tmp_path / "tags.json"
    assert run_cli(tool.main, ["--dataset", "ovshapes_small_captions", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["images"] and all(im["pos_category_ids"] for im in data["images"])
    captions = tmp_path / "caps.json"
    captions.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                    "annotations": [{"image_id": 1, "caption": "Two dogs and a TV."}]}))  # fmt: skip
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"categories": [{"id": 18, "name": "dog"}, {"id": 72, "name": "tv"}]}))
    coco_out = tmp_path / "coco_tags.json"
    args = ["--captions", str(captions), "--categories", str(cats), "--synonyms", "coco", "--output", str(coco_out)]
    assert run_cli(tool.main, args) == 0
    assert json.loads(coco_out.read_text())["images"][0]["pos_category_ids"] == [18, 72]
    assert run_cli(tool.main, ["--captions", str(captions)]) == 2
    assert "give --dataset" in capsys.readouterr().err
    assert run_cli(tool.main, ["--captions", str(tmp_path / "none.json"), "--categories", str(cats),
                               "--output", str(coco_out)]) == 2  # fmt: skip
    assert "none.json" in capsys.readouterr().err


def test_generate_pseudo_labels_from_a_results_file(tmp_path, capsys):
    from ovd.data.catalog import get_dataset
    from ovd.data.coco import load_dataset

    info = get_dataset("ovshapes_small_captions")
    rec = load_dataset(info)[0]
    cid = info.category_ids[int(rec.pos_labels[0])]
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": rec.image_id, "category_id": cid, "bbox": [1, 2, 30, 40], "score": 0.99}]))
    out = tmp_path / "pseudo.json"
    tool = _tool("generate_pseudo_labels")
    args = ["--dataset", "ovshapes_small_captions", "--source", "file", "--boxes", str(dets), "--output", str(out)]
    assert run_cli(tool.main, args) == 0
    data = json.loads(out.read_text())
    assert [a["bbox"] for a in data["annotations"]] == [[1.0, 2.0, 30.0, 40.0]]
    assert run_cli(tool.main, ["--dataset", "ovshapes_small_captions", "--source", "clip", "--output", str(out)]) == 2
    assert "--region-store" in capsys.readouterr().err
