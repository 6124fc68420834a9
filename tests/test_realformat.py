"""The documented OV-COCO and OV-LVIS pipelines on miniature real-format trees (issue #17): smoke runs of
configs/{coco,lvis}/pipeline.yaml end to end, the shared steps' provenance checks and the pre-flight check."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.data.catalog import get_dataset
from ovd.data.coco import load_dataset
from ovd.distill import RegionStore
from ovd.errors import OVDError
from ovd.prepare import PseudoLabelsCfg, RegionsCfg, StorePlan, ensure_caption_tags, ensure_pseudo_labels, ensure_store
from ovd.utils.cli import run_cli
from ovd.utils.io import read_json, write_json

REPO = Path(__file__).parents[1]


def _module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(name):
    return _module(REPO / "tools" / f"{name}.py")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Both miniature trees under one datasets root (made once per module); ``OVD_DATASETS`` points at it."""
    root = tmp_path_factory.mktemp("realformat") / "datasets"
    rf = _module(Path(__file__).parent / "realformat.py")
    return {"coco": rf.build_ov_coco(root), "lvis": rf.build_ov_lvis(root), "root": root}


@pytest.fixture
def env(tree, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tree["root"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    return tree


def _store_ids(path: Path) -> set[int]:
    return {int(i) for i in RegionStore.open(path).image_ids}


def test_the_tree_has_the_real_splits_properties(env):
    coco = env["coco"]
    assert get_dataset("coco_ovd_train").num_classes == 80
    seen = load_dataset(get_dataset("coco_ovd_train"))
    assert len(seen) == coco["seen_images"] < coco["train_images"]  # OVR-CNN keeps images with a base box
    assert coco["novel_only_ids"] and set(coco["novel_only_ids"]) <= set(coco["caption_only_ids"])
    base = set(get_dataset("coco_ovd_train").base_classes)
    assert all(set(r.labels.tolist()) <= base for r in seen)


def test_coco_pipeline_smoke_runs_end_to_end(env, tmp_path):
    """Fixes 1, 2 and 4: the caption tags are made by the pipeline, one store holds the union of the seen split
    and the caption images (the pseudo-labeller finds every image), it is extracted once and listed."""
    tags = Path(env["root"]) / "coco/annotations/captions_train2017_tags_allcaps.json"
    assert not tags.exists()  # nobody ran tools/tag_captions.py
    out = tmp_path / "out"
    args = ["--config-file", str(REPO / "configs/coco/pipeline.yaml"), "--output-dir", str(out), "--smoke"]
    assert run_cli(_tool("run_pipeline").main, [*args, "--smoke-tiny", "--smoke-images", "8"]) == 0
    result = read_json(out / "ablation.json")
    assert [r["stage"] for r in result["stages"]] == ["base", "rkd", "pis", "rkd_pis", "rkd_pis_wt"]
    (store, entry), *others = result["region_stores"].items()
    assert not others and entry == {"datasets": ["coco_ovd_train", "coco_captions_train"], "status": "extracted"}
    assert list(result["caption_tags"].values()) == ["made"]
    assert list(result["pseudo_labels"].values()) == ["made"]
    ids = _store_ids(Path(store))
    seen = {im["id"] for im in read_json(out / "smoke/data/coco_ovd_train.json")["images"]}  # the smoke subset
    pseudo = read_json(next(iter(result["pseudo_labels"])))
    assert seen < ids and {im["id"] for im in pseudo["images"]} <= ids
    assert set(env["coco"]["caption_only_ids"]) & {im["id"] for im in pseudo["images"]}  # caption-only images labelled
    for stage in ("rkd", "rkd_pis", "rkd_pis_wt"):  # every distilling stage reads the one store
        cfg = load_config(out / stage / "config.yaml")
        assert {s.region_store for s in cfg.data.sources} | {cfg.data.region_store} - {""} <= {store}
    assert not (Path(env["root"]) / "regions").exists()  # a smoke run never fills a store the recipes name
    assert get_dataset("coco_ovd_train").ann_file.startswith("coco/")  # the catalog is restored


def test_lvis_pipeline_smoke_runs_end_to_end(env, tmp_path):
    """The documented LVIS sequence: prepare_lvis norare and imagenet, then the pipeline (its own ImageNet store)."""
    from ovd.data.lvis import register_lvis

    root = Path(env["root"])
    prepare = _tool("prepare_lvis").main
    assert run_cli(prepare, ["norare"]) == 0
    assert run_cli(prepare, ["imagenet", "--wnids", str(env["lvis"]["wnid_map"])]) == 0
    register_lvis()
    try:
        out = tmp_path / "out"
        args = ["--config-file", str(REPO / "configs/lvis/pipeline.yaml"), "--output-dir", str(out), "--smoke"]
        assert run_cli(_tool("run_pipeline").main, [*args, "--smoke-tiny", "--smoke-images", "6"]) == 0
        result = read_json(out / "ablation.json")
        assert len(result["stages"]) == 5 and all("APr" in r for r in result["stages"])
        stores = {tuple(v["datasets"]): Path(k) for k, v in result["region_stores"].items()}
        assert set(stores) == {("lvis_v1_train_norare",), ("imagenet_lvis",)}
        assert len(_store_ids(stores[("imagenet_lvis",)])) == 6  # every ImageNet-LVIS image of the smoke run
        pseudo = read_json(next(iter(result["pseudo_labels"])))
        assert len(pseudo["images"]) == 6 and len(pseudo["annotations"]) == 6  # one box per image label
        norare = read_json(root / "lvis/lvis_v1_train_norare.json")
        rare = {c["id"] for c in norare["categories"] if c["frequency"] == "r"}
        assert rare and not {a["category_id"] for a in norare["annotations"]} & rare
    finally:
        register_lvis(root / "nowhere")  # the empty vocabulary other modules expect


def _proposals(path: Path, records) -> Path:
    rng = np.random.default_rng(0)
    boxes = []
    for r in records:
        for _ in range(4):
            x, y = rng.uniform(0, r.width / 2), rng.uniform(0, r.height / 2)
            boxes.append({"image_id": r.image_id, "bbox": [x, y, r.width / 3, r.height / 3], "score": rng.random()})
    write_json(path, boxes)
    return path


def test_stores_tags_and_pseudo_labels_are_reused_only_with_their_provenance(env, tmp_path):
    """Fix 3 (and the tag / pseudo-label files): reuse needs the same model, weights, proposals and images."""
    info = get_dataset("coco_captions_train")
    assert ensure_caption_tags(info) in ("made", "reused")
    assert ensure_caption_tags(info) == "reused"
    tiny = ["clip.model=ovd-tiny-cnn", "clip.pretrained=", "device=cpu", "data.num_workers=0"]
    cfg = load_config(REPO / "configs/coco/base.yaml", tiny)
    records = load_dataset(get_dataset("coco_ovd_train")) + load_dataset(info)
    props = _proposals(tmp_path / "props.json", records)
    regions = RegionsCfg(proposals=str(props), k=3)
    store = tmp_path / "store"
    few = StorePlan(store, ("coco_ovd_train",))
    torch.manual_seed(0)
    assert ensure_store(few, regions, cfg, props) == "extracted"
    torch.manual_seed(0)
    assert ensure_store(few, regions, cfg, props) == "reused"
    with pytest.raises(OVDError, match="different extraction.*dataset"):  # another image set
        torch.manual_seed(0)
        ensure_store(StorePlan(store, ("coco_ovd_train", "coco_captions_train")), regions, cfg, props)
    with pytest.raises(OVDError, match="different extraction.*weights_sha256"):  # other (random) CLIP weights
        torch.manual_seed(1)
        ensure_store(few, regions, cfg, props)
    with pytest.raises(OVDError, match="different extraction.*k"):
        torch.manual_seed(0)
        ensure_store(few, RegionsCfg(proposals=str(props), k=2), cfg, props)

    union = StorePlan(tmp_path / "union", ("coco_ovd_train", "coco_captions_train"))
    torch.manual_seed(0)
    ensure_store(union, regions, cfg, props)
    labels = tmp_path / "pseudo.json"
    p = PseudoLabelsCfg(dataset="coco_captions_train", name="x", threshold=0.0)
    status = []
    for threshold, seed in ((0.0, 0), (0.0, 0), (0.5, 0), (0.0, 1)):  # a random-init CLIP's text: seeded
        torch.manual_seed(seed)
        status.append(ensure_pseudo_labels(replace(p, threshold=threshold), cfg, union.path, labels, tmp_path))
    assert status == ["made", "reused", "made", "made"]  # remade for another threshold, other class embeddings
    assert read_json(labels)["images"]

    data = read_json(info.ann_file_path)  # tags from other captions: an error naming the file and the field
    data["info"]["ovd_provenance"]["captions_sha256"] = "0" * 64
    write_json(info.ann_file_path, data)
    with pytest.raises(OVDError, match="captions_train2017_tags_allcaps.json.*captions_sha256"):
        ensure_caption_tags(info)
    del data["info"]
    write_json(info.ann_file_path, data)
    assert ensure_caption_tags(info) == "unverified"
    info.ann_file_path.unlink()


def test_preflight_lists_every_problem_before_training(env, tmp_path, capsys):
    """A missing caption-tag file (train_net does not make it), a missing image and an unwritable output."""
    missing = Path(env["coco"]["missing_image"])
    moved = missing.with_suffix(".bak")
    missing.rename(moved)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    try:
        args = [
            "--config-file", str(REPO / "configs/coco/pis.yaml"), "--output-dir", str(blocker / "out"),
            "--preflight-only", "data.sources[1].dataset=coco_captions_train", "data.sources[1].supervision=image",
            "clip.model=ovd-tiny-cnn", "clip.pretrained=", "model.backbone.weights=",
        ]  # fmt: skip
        assert run_cli(_tool("train_net").main, args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "3 problem(s)" in err
        assert "captions_train2017_tags_allcaps.json not found" in err and "tools/tag_captions.py" in err
        assert f"1 of {env['coco']['seen_images']} images missing: {missing}" in err
        assert f"output folder {blocker / 'out'} is not writable" in err
    finally:
        moved.rename(missing)
    out = tmp_path / "ok"
    args = ["--config-file", str(REPO / "configs/coco/pipeline.yaml"), "--output-dir", str(out), "--preflight-only"]
    assert run_cli(_tool("run_pipeline").main, [*args, "clip.model=ovd-tiny-cnn", "clip.pretrained=",
                                                  "model.backbone.weights="]) == 0  # fmt: skip
    assert "pre-flight check passed" in capsys.readouterr().out
    assert out.is_dir() and not (out / "base").exists()  # checked, nothing trained


def test_the_recipes_name_one_store_for_the_union_of_images(tmp_path, monkeypatch):
    """Fix 2: the COCO recipes' RKD and RKD+PIS stores are one store, of the box and the caption images."""
    from ovd.prepare import plan_stores

    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    p = PseudoLabelsCfg(dataset="coco_captions_train", name="coco_captions_train_pseudo")
    recipes = [(n, load_config(REPO / f"configs/coco/{n}.yaml")) for n in ("base", "rkd", "pis", "rkd_pis")]
    main, own = plan_stores(p, "coco_ovd_train", recipes, tmp_path / "out")
    assert own is None and main.path == tmp_path / "regions/coco_ovd_train_vitb32"
    assert main.datasets == ("coco_ovd_train", "coco_captions_train")
    other = load_config(REPO / "configs/coco/rkd_pis.yaml", [f"data.sources[1].region_store={tmp_path}/other"])
    with pytest.raises(OVDError, match="different region stores for the same images.*other \\(stage x\\)"):
        plan_stores(p, "coco_ovd_train", [*recipes, ("x", other)], tmp_path / "out")
    lvis = PseudoLabelsCfg(dataset="imagenet_lvis", name="imagenet_lvis_pseudo", own_regions=True)
    recipes = [(n, load_config(REPO / f"configs/lvis/{n}.yaml")) for n in ("rkd", "rkd_pis")]
    main, own = plan_stores(lvis, "lvis_v1_train_norare", recipes, tmp_path / "out")
    assert (main.path.name, main.datasets) == ("lvis_v1_train_norare_vitb32", ("lvis_v1_train_norare",))
    assert (own.path.name, own.datasets) == ("imagenet_lvis_vitb32", ("imagenet_lvis",))


def test_preflight_finds_a_missing_region_store_of_train_net(env, tmp_path):
    from ovd.preflight import preflight

    tiny = ["clip.model=ovd-tiny-cnn", "clip.pretrained=", "model.backbone.weights=", f"data.region_store={tmp_path}/s"]
    report = preflight([load_config(REPO / "configs/coco/rkd.yaml", tiny)], [tmp_path / "out"])
    assert [p for p in report.problems if "region store" in p] == [
        f"region store {tmp_path}/s not found or unfinished; make it with tools/extract_region_embeddings.py "
        "(tools/run_pipeline.py makes its own)"
    ]
    assert report.images == {"coco_ovd_train": env["coco"]["seen_images"], "coco_ovd_val": env["coco"]["val_images"]}
