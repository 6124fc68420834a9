"""Caption tagging (METHOD §4.1, §10.16), the synonym tables and the OV-Shapes caption-tag dataset."""

import json

import pytest

from ovd.data.builtin import COCO_CATEGORIES
from ovd.data.captions import (
    CaptionTagger,
    coco_synonyms,
    normalize_name,
    ovshapes_synonyms,
    plural_forms,
    synonym_table,
    tag_captions,
    tag_counts,
)
from ovd.errors import OVDError


def test_method_10_16_reference_case():
    # name → synonyms {"cat"}: "a cat on a mat" is tagged, "concatenate" is not, "cat" at the start is
    tag = CaptionTagger({1: ["cat"]}, plurals=False)
    assert tag(["a cat on a mat"]) == [1]
    assert tag(["concatenate these"]) == []
    assert tag(["cat at the start"]) == [1]
    assert tag(["ends with a cat"]) == [1]
    assert tag(["cat"]) == [1]  # starts and ends with it


def test_word_boundaries_punctuation_and_case():
    tag = CaptionTagger({1: ["cat"], 2: ["hot dog"]})
    assert tag(["A category of catalogs."]) == []  # "cat" inside words, "cats" not either
    assert tag(["a bobcat", "scatter", "cat-alog"]) == [1]  # only "cat-alog": the hyphen splits words
    assert tag(["Look, a CAT."]) == [1]  # punctuation and case do not hide a word
    assert tag(["a hot dog stand", "nothing"]) == [2]
    assert tag(["a hot  dogma"]) == []
    assert tag(["a hot", "dog"]) == [2]  # captions are joined with a space, as the reference does


def test_longest_match_hides_names_inside_a_found_name():
    table = {18: ["dog"], 58: ["hot dog"], 23: ["bear"], 88: ["teddy bear"]}
    tag = CaptionTagger(table)
    assert tag(["two hot dogs and a teddy bear"]) == [58, 88]
    assert tag(["a hot dog, a hot dog and a dog"]) == [18, 58]  # every occurrence is masked, the lone dog stays
    assert CaptionTagger(table, longest_match=False)(["two hot dogs and a teddy bear"]) == [18, 23, 58, 88]


def test_plural_rule():
    assert plural_forms("cat") == ["cats"] and plural_forms("key") == ["keys"]  # vowel + y: +s
    assert plural_forms("cross") == ["crosses"] and plural_forms("box") == ["boxes"]
    assert plural_forms("couch") == ["couches"] and plural_forms("brush") == ["brushes"]
    assert plural_forms("butterfly") == ["butterflies"]  # consonant + y → ies
    assert plural_forms("lightning bolt") == ["lightning bolts"]  # the last word
    assert plural_forms("") == []


def test_plurals_and_synonyms():
    tag = CaptionTagger({1: ["crescent", "moon"], 2: ["key"]})
    assert tag(["two moons and three keys"]) == [1, 2]
    assert CaptionTagger({2: ["key"]}, plurals=False)(["three keys"]) == []
    assert CaptionTagger({3: ["puppy"]})(["two puppies"]) == [3]


def test_normalize_name():
    assert normalize_name("Hot_dog (food)") == "hot dog"
    assert normalize_name("teddy bear") == "teddy bear"
    assert normalize_name("five-pointed star") == "five pointed star"
    assert normalize_name("train_(railroad_vehicle)") == "train"


def test_coco_synonyms_table():
    table = coco_synonyms()
    assert set(table) == {cid for cid, _ in COCO_CATEGORIES}  # the 80 COCO ids
    for cid, name in COCO_CATEGORIES:
        assert table[cid][0] == name  # the class name comes first
    owner: dict[str, int] = {}
    for cid, names in CaptionTagger(table).terms.items():
        for term in names:
            assert owner.setdefault(term, cid) == cid, f"{term!r} names both {owner[term]} and {cid}"
    tag = CaptionTagger(table)
    assert tag(["Two men and a woman walk their dogs."]) == [1, 18]
    texts = ["three buses and a few hot dogs", "knives and forks", "a laptop with two mice"]
    assert tag(texts) == [6, 48, 49, 58, 73, 74]  # no dog (18) in "hot dogs"
    assert tag(["a teddy bear and a baseball bat"]) == [39, 88]  # no bear (23), no "baseball" ball (37)
    assert tag(["a television and a fridge"]) == [72, 82]
    assert tag(["a category of catalogs"]) == []
    assert synonym_table("coco") == table
    with pytest.raises(OVDError, match="unknown synonym table 'lvis'"):
        synonym_table("lvis")


def test_ovshapes_synonyms_match_the_generators_plurals():
    from ovd.data.ovshapes import CLASSES, plural

    table = ovshapes_synonyms()
    assert sorted(table) == list(range(1, len(CLASSES) + 1))
    for k, cls in enumerate(CLASSES):
        assert table[k + 1][0] == cls.name
        for term in cls.terms:  # the tagger's plural is the one the captions use
            assert normalize_name(plural(term)) in plural_forms(normalize_name(term)), term
    tag = CaptionTagger(table)
    assert tag(["two red five-pointed stars", "three crosses"]) == [4, 5]


def _captions():
    return {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.png"}],
        "annotations": [
            {"image_id": 1, "caption": "a red star"},
            {"image_id": 1, "caption": "and two keys"},
            {"image_id": 2, "caption": "nothing to see"},
            {"image_id": 3, "caption": "a moon"},
        ],
    }


CATS = [{"id": 5, "name": "star"}, {"id": 9, "name": "key"}, {"id": 11, "name": "crescent", "synonyms": ["moon"]}]


def test_tag_captions_joins_captions_and_drops_untagged():
    out = tag_captions(_captions(), CATS)
    assert [(im["id"], im["pos_category_ids"]) for im in out["images"]] == [(1, [5, 9]), (3, [11])]
    assert out["images"][0]["file_name"] == "a.png"  # the image entry is kept as it is
    assert out["annotations"] == [] and out["categories"] == CATS
    assert tag_counts(out) == {5: 1, 9: 1, 11: 1}
    syn = {5: ["star"], 9: ["key"], 11: ["crescent"], 12: ["moon"]}  # a table replaces the categories' own names
    out = tag_captions(_captions(), CATS, synonyms=syn)
    assert [im["id"] for im in out["images"]] == [1]  # "moon" names class 12, which is not in the vocabulary
    assert out["categories"][2]["synonyms"] == ["crescent"]


def test_tag_captions_empty_input():
    out = tag_captions({"images": [], "annotations": []}, CATS)
    assert out == {"images": [], "categories": CATS, "annotations": []}
    assert tag_counts(out) == {5: 0, 9: 0, 11: 0}


def test_tag_captions_bad_inputs():
    with pytest.raises(OVDError, match="x.json: annotations: missing list"):
        tag_captions({"images": []}, CATS, path="x.json")
    with pytest.raises(OVDError, match=r"annotations\[0\]"):
        tag_captions({"images": [], "annotations": [{"caption": "x"}]}, CATS)
    with pytest.raises(OVDError, match=r"images\[0\]"):
        tag_captions({"images": [{"file_name": "a"}], "annotations": []}, CATS)
    with pytest.raises(OVDError, match=r"categories\[1\]"):
        tag_captions(_captions(), [{"id": 5, "name": "star"}, {"name": "key"}])
    with pytest.raises(OVDError, match=r"x.json: synonyms: the synonym table has no names for category ids \[9, 11\]"):
        tag_captions(_captions(), CATS, synonyms={5: ["star"]}, path="x.json")
    with pytest.raises(OVDError, match=r"synonyms\[5\]"):
        tag_captions(_captions(), CATS, synonyms={5: "star", 9: ["key"], 11: ["moon"]})
    with pytest.raises(OVDError, match="no usable name"):
        CaptionTagger({5: ["()", "_"]})


@pytest.fixture
def ovshapes_root(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "datasets"  # shared with the other tests that generate OV-Shapes
    monkeypatch.setenv("OVD_DATASETS", str(root))
    return root


def test_ovshapes_tags_equal_the_objects_present(ovshapes_root):
    from ovd.data.catalog import get_dataset
    from ovd.data.coco import load_dataset
    from ovd.data.ovshapes import CLASS_NAMES, PRESETS, render_image

    info = get_dataset("ovshapes_small_captions")  # generates the world and the tags on first use
    assert info.ann_type == "image" and info.extra["synonyms"] == "ovshapes"
    tags = {r.image_id: set(r.pos_labels.tolist()) for r in load_dataset(info)}
    train = get_dataset("ovshapes_small_train")
    captions = json.loads(info.resolve(info.extra["captions"]).read_text())
    novel = set(info.novel_classes)
    assert novel and set(info.base_classes).isdisjoint(novel)
    position = {img["file_name"]: img["id"] for img in captions["images"]}
    assert len(position) == PRESETS["small"].num_train
    novel_names = [CLASS_NAMES[k] for k in sorted(novel)]
    seen_novel = set()
    for i in range(PRESETS["small"].num_train):
        _, objects, _ = render_image("small", 0, "train", i, novel_names)  # what the image shows
        present = {obj["class_id"] for obj in objects}
        assert tags.get(position[f"train_{i:06d}.png"], set()) == present, i
        seen_novel |= present & novel
    assert seen_novel  # novel classes are tagged although they have no boxes
    boxed = {r.image_id: set(r.labels.tolist()) for r in load_dataset(train)}
    assert all(labels.isdisjoint(novel) for labels in boxed.values())


def test_tag_captions_tool_on_the_coco_catalog_entry(ovshapes_root, capsys):
    from importlib import util
    from pathlib import Path

    from ovd.utils.cli import run_cli

    spec = util.spec_from_file_location("tag_captions", Path(__file__).parents[2] / "tools" / "tag_captions.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = ovshapes_root / "coco" / "annotations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [{"image_id": 1, "caption": "Two hot dogs next to a TV."},
                        {"image_id": 1, "caption": "A man eats."}, {"image_id": 2, "caption": "A view."}],
    }))  # fmt: skip
    assert run_cli(tool.main, ["--dataset", "coco_captions_train"]) == 0  # the packaged COCO table, by default
    data = json.loads((folder / "captions_train2017_tags_allcaps.json").read_text())
    assert [(im["id"], im["pos_category_ids"]) for im in data["images"]] == [(1, [1, 58, 72])]
    assert len(data["categories"]) == 80 and data["annotations"] == []
    assert run_cli(tool.main, ["--dataset", "coco_captions_train", "--synonyms", "lvis"]) == 2
    assert "unknown synonym table 'lvis'" in capsys.readouterr().err
