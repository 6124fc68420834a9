"""Caption tagging (METHOD §4.1, §10.16) and the OV-Shapes caption-tag dataset."""

import json

import pytest

from ovd.data.captions import CaptionTagger, normalize_name, plural_forms, tag_captions
from ovd.errors import OVDError


def test_reference_case():
    tag = CaptionTagger({1: ["cat"]}, plurals=False)
    assert tag(["a cat on a mat"]) == [1]
    assert tag(["concatenate these"]) == []
    assert tag(["cat at the start"]) == [1]
    assert tag(["ends with a cat"]) == [1]


def test_word_boundaries_punctuation_and_case():
    tag = CaptionTagger({1: ["cat"], 2: ["hot dog"]})
    assert tag(["A category of catalogs."]) == []
    assert tag(["Look, a CAT."]) == [1]
    assert tag(["a hot dog stand", "nothing"]) == [2]
    assert tag(["a hot  dogma"]) == []


def test_plurals_and_synonyms():
    assert plural_forms("cross") == ["crosses"] and plural_forms("key") == ["keys"]
    assert plural_forms("butterfly") == ["butterflies"] and plural_forms("lightning bolt") == ["lightning bolts"]
    tag = CaptionTagger({1: ["crescent", "moon"], 2: ["key"]})
    assert tag(["two moons and three keys"]) == [1, 2]
    assert CaptionTagger({2: ["key"]}, plurals=False)(["three keys"]) == []


def test_normalize_name():
    assert normalize_name("Hot_dog (food)") == "hot dog"
    assert normalize_name("teddy bear") == "teddy bear"


def test_tag_captions_joins_captions_and_drops_untagged():
    captions = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.png"}],
        "annotations": [
            {"image_id": 1, "caption": "a red star"},
            {"image_id": 1, "caption": "and two keys"},
            {"image_id": 2, "caption": "nothing to see"},
            {"image_id": 3, "caption": "a moon"},
        ],
    }
    cats = [{"id": 5, "name": "star"}, {"id": 9, "name": "key"}, {"id": 11, "name": "crescent", "synonyms": ["moon"]}]
    out = tag_captions(captions, cats)
    assert [(im["id"], im["pos_category_ids"]) for im in out["images"]] == [(1, [5, 9]), (3, [11])]
    assert out["annotations"] == [] and out["categories"] == cats
    with pytest.raises(OVDError, match="annotations"):
        tag_captions({"images": []}, cats, path="x.json")
    with pytest.raises(OVDError, match=r"annotations\[0\]"):
        tag_captions({"images": [], "annotations": [{"caption": "x"}]}, cats)


def test_ovshapes_tags_equal_the_objects_present(tmp_path, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    from ovd.data.catalog import get_dataset
    from ovd.data.coco import load_dataset

    info = get_dataset("ovshapes_small_captions")
    tags = {r.image_id: set(r.pos_labels.tolist()) for r in load_dataset(info)}
    captions = json.loads((tmp_path / "ovshapes/small/annotations/captions_train.json").read_text())
    assert tags and len(tags) <= len(captions["images"])
    novel = set(info.novel_classes)
    assert any(t & novel for t in tags.values())  # novel classes are tagged although they have no boxes
    train = {r.image_id: set(r.labels.tolist()) for r in load_dataset(get_dataset("ovshapes_small_train"))}
    for image_id, labels in train.items():
        assert labels <= tags.get(image_id, set()), image_id  # every boxed (base) class is named
        assert not (tags.get(image_id, set()) - labels) - novel  # a base class is tagged only with its box
