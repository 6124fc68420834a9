"""The multi-stage pipeline on OV-Shapes `small`: stages, region extraction, demo, ablation table,
and resumption after a failed stage without redoing finished ones."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import ovd.engine.trainer as trainer
from ovd.distill import RegionStore
from ovd.errors import OVDError
from ovd.pipeline import format_ablation, load_pipeline, run_pipeline, stage_row

REPO = Path(__file__).parents[1]
FAST = [
    "data.train=ovshapes_small_train",
    "data.test=ovshapes_small_val",
    "data.num_workers=0",
    "clip.pretrained=",
    "solver.ims_per_batch=2",
    "solver.max_iter=2",
    "solver.warmup_iters=1",
    "solver.steps=[1]",
    "input.min_size_train=[128]",
    "input.min_size_train_sampling=choice",
    "input.min_size_test=128",
    "model.rpn.post_nms_top_n_test=50",
]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path_factory.getbasetemp() / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


SOURCES = (
    "data.sources=[{dataset: ovshapes_small_train, batch_size: 1, ratio: 1},"
    " {dataset: ovshapes_small_pseudo, supervision: pseudo, batch_size: 2, ratio: 4, min_size: [96], max_size: 160}]"
)


def _pipeline_file(tmp_path: Path, **extra) -> Path:
    spec = {
        "stages": [
            {"name": "base", "config": str(REPO / "configs/ovshapes/base.yaml"), "overrides": FAST},
            {"name": "rkd", "config": str(REPO / "configs/ovshapes/rkd.yaml"), "overrides": FAST},
            {"name": "pis", "config": str(REPO / "configs/ovshapes/pis.yaml"), "overrides": [*FAST, SOURCES]},
            {"name": "wt", "config": str(REPO / "configs/ovshapes/rkd_pis_wt.yaml"), "overrides": [*FAST, SOURCES]},
        ],
        "regions": {"proposals": "base", "k": 3},
        "pseudo_labels": {"dataset": "ovshapes_small_captions", "name": "ovshapes_small_pseudo", "threshold": 0.0},
        "demo_images": 1,
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_pipeline_runs_and_resumes(tmp_path, monkeypatch):
    pipe = _pipeline_file(tmp_path)
    out = tmp_path / "out"
    calls = []
    real_train = trainer.train

    def failing_train(cfg, output_dir, **kw):
        calls.append(Path(output_dir).name)
        if Path(output_dir).name == "rkd" and calls.count("rkd") == 1:
            raise RuntimeError("simulated crash")
        return real_train(cfg, output_dir, **kw)

    monkeypatch.setattr(trainer, "train", failing_train)
    with pytest.raises(RuntimeError, match="simulated"):
        run_pipeline(pipe, out)
    assert (out / "base" / "eval" / "metrics.json").is_file()
    assert (out / "regions" / "ovshapes_small_train" / "meta.json").is_file()  # complete region store
    result = run_pipeline(pipe, out)
    assert calls == ["base", "rkd", "rkd", "pis", "wt"]  # base was not trained again
    assert [r["stage"] for r in result["stages"]] == ["base", "rkd", "pis", "wt"]
    times = {r["stage"]: r["time_s"] for r in result["stages"]}
    assert times["base"] is None and all(times[s] > 0 for s in ("rkd", "pis", "wt"))  # base: finished earlier
    assert set(result["prepare_time_s"]) == {"data", "regions", "pseudo_labels"}  # no teacher step here
    assert "| base |" in format_ablation(result["stages"]) and "| skipped |" in format_ablation(result["stages"])
    pseudo = json.loads((out / "pseudo_labels" / "ovshapes_small_pseudo.json").read_text())
    assert pseudo["annotations"] and all(len(a["bbox"]) == 4 for a in pseudo["annotations"])
    wt = torch.load(out / "wt" / "model_final.pth", weights_only=False)["model"]
    rkd_state = torch.load(out / "rkd" / "model_final.pth", weights_only=False)["model"]
    key = "roi_heads.classifier.linear.weight"
    assert torch.equal(wt[key], rkd_state[key])  # weight transfer starts from RKD and keeps its projection
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["stages"] == result["stages"]
    rkd = json.loads((out / "rkd" / "eval" / "metrics.json").read_text())
    assert {"fidelity_cosine_base", "fidelity_agreement_novel", "fidelity_teacher_acc_novel"} <= set(rkd)
    assert -1.0 <= rkd["fidelity_cosine_base"] <= 1.0
    assert (out / "demo" / "detections.json").is_file()


def test_parallel_stages_give_the_sequential_numbers(tmp_path):
    """rkd and pis both start from base: with two stage processes they train at once; every number
    equals the sequential run's, and a stage process that fails is named after the others finish."""
    (tmp_path / "seq").mkdir()
    parallel_dir = tmp_path / "par"
    parallel_dir.mkdir()
    sequential = run_pipeline(_pipeline_file(tmp_path / "seq"), tmp_path / "seq" / "out")
    result = run_pipeline(_pipeline_file(parallel_dir, parallel_stages=2), parallel_dir / "out")
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert drop_time(result["stages"]) == drop_time(sequential["stages"])
    assert all(r["time_s"] > 0 for r in result["stages"])
    for stage in ("base", "rkd", "pis", "wt"):
        a = torch.load(tmp_path / "seq" / "out" / stage / "model_final.pth", weights_only=False)["model"]
        b = torch.load(parallel_dir / "out" / stage / "model_final.pth", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage

    spec = yaml.safe_load((parallel_dir / "pipeline.yaml").read_text())
    garbage = parallel_dir / "garbage.pth"  # exists (the pre-flight check passes), but is no checkpoint
    garbage.write_text("not a checkpoint")
    spec["stages"].insert(1, {**spec["stages"][0], "name": "broken", "overrides": [*FAST, f"init_weights={garbage}"]})
    (parallel_dir / "broken.yaml").write_text(yaml.safe_dump(spec))
    spec["stages"][1]["overrides"][-1] = "init_weights=/nonexistent.pth"
    (parallel_dir / "missing.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(OVDError, match=r"pre-flight check: 1 problem.*init_weights: file not found: /nonexistent.pth"):
        run_pipeline(parallel_dir / "missing.yaml", parallel_dir / "out")
    with pytest.raises(OVDError, match=r"stage\(s\) broken failed"):
        run_pipeline(parallel_dir / "broken.yaml", parallel_dir / "out")
    assert not (parallel_dir / "out" / "broken" / "model_final.pth").exists()
    with pytest.raises(OVDError, match="parallel_stages: must be >= 1"):
        run_pipeline(_pipeline_file(tmp_path, parallel_stages=0), tmp_path / "x")
    with pytest.raises(OVDError, match="parallel_stages: must be >= 1, got -1"):
        run_pipeline(_pipeline_file(tmp_path), tmp_path / "x", parallel_stages=-1)


def test_pipeline_file_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stages:\n  - name: a\n    config: x.yaml\n    overide: []\n")
    with pytest.raises(OVDError, match="stages\\[0\\].overide"):
        load_pipeline(bad)
    bad.write_text("stages:\n  - name: a\n    config: x.yaml\n  - name: a\n    config: y.yaml\n")
    with pytest.raises(OVDError, match="unique"):
        load_pipeline(bad)
    with pytest.raises(OVDError, match="not found"):
        load_pipeline(tmp_path / "none.yaml")


def test_stage_rows_for_both_metrics():
    ovd_metrics = {"AP50_novel": 12.5, "AP50_base": 40.0, "AP50_all": 30.25, "AP": 20.0, "AP50": 30.25}
    row = stage_row("base", ovd_metrics, 61.04)
    assert row == {"stage": "base", **{k: ovd_metrics[k] for k in ("AP50_novel", "AP50_base", "AP50_all", "AP")},
                   "time_s": 61.0}  # fmt: skip
    lvis_metrics = {
        "bbox": {"APr": 1.5, "APc": 11.0, "APf": 18.25, "AP": 11.3, "AP50": 19.4},
        "segm": {"APr": 1.75, "APc": 11.8, "APf": 19.7, "AP": 12.2},
        "dataset": "ovshapes_lt_val",
    }
    lt = stage_row("rkd", lvis_metrics)
    assert lt == {"stage": "rkd", "APr": 1.5, "APc": 11.0, "APf": 18.25, "AP": 11.3, "mask_APr": 1.75,
                  "mask_AP": 12.2, "time_s": None}  # fmt: skip
    table = format_ablation([lt]).splitlines()
    assert table[0] == "| stage | APr | APc | APf | AP | mask APr | mask AP | time (s) |"
    assert table[2] == "| rkd | 1.5 | 11.0 | 18.2 | 11.3 | 1.8 | 12.2 | skipped |"
    assert format_ablation([row]).splitlines()[2] == "| base | 12.5 | 40.0 | 30.2 | 20.0 | 61 |"


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on NumPy 2
def test_long_tailed_pipeline_reports_apr(tmp_path):
    """The OV-LVIS path end to end on OV-Shapes-LT `small`: Mask R-CNN base → regions → pseudo boxes of the
    image-level labels → RKD → RKD+PIS+WT, each scored with the federated LVIS metric (box and mask APr)."""
    lt = [*FAST[2:], "data.train=ovshapes_lt_small_train_norare", "data.test=ovshapes_lt_small_val",
          "model.roi_heads.detections_per_image=20"]  # fmt: skip
    sources = (
        "data.sources=[{dataset: ovshapes_lt_small_train_norare, batch_size: 1, ratio: 1},"
        " {dataset: ovshapes_lt_small_pseudo, supervision: pseudo, batch_size: 2, ratio: 4, min_size: [96],"
        " max_size: 160}]"
    )
    spec = {
        "stages": [
            {"name": "base", "config": str(REPO / "configs/ovshapes_lt/base.yaml"), "overrides": lt},
            {"name": "rkd", "config": str(REPO / "configs/ovshapes_lt/rkd.yaml"), "overrides": lt},
            {"name": "wt", "config": str(REPO / "configs/ovshapes_lt/rkd_pis_wt.yaml"), "overrides": [*lt, sources]},
        ],
        "regions": {"proposals": "base", "k": 3},
        "pseudo_labels": {
            "dataset": "ovshapes_lt_small_imagenet",  # the class-balanced ImageNet split: its own region store
            "name": "ovshapes_lt_small_pseudo",
            "threshold": 0.0,
            "own_regions": True,
        },  # fmt: skip
        "demo_images": 0,
    }
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump(spec))
    result = run_pipeline(pipe, tmp_path / "out")
    rows = result["stages"]
    assert [r["stage"] for r in rows] == ["base", "rkd", "wt"]
    for r in rows:
        assert all(0.0 <= r[k] <= 100.0 for k in ("APc", "APf", "AP", "mask_AP")), r
        assert r["APr"] is None or 0.0 <= r["APr"] <= 100.0  # a few iterations per stage: the wiring is tested
    # here, the numbers of each path against floors in tests/engine/test_*floors_e2e.py
    assert format_ablation(rows).startswith("| stage | APr | APc | APf | AP | mask APr | mask AP |")
    pseudo = json.loads((tmp_path / "out" / "pseudo_labels" / "ovshapes_lt_small_pseudo.json").read_text())
    rare = {c["id"] for c in pseudo["categories"] if c.get("frequency") == "r"}
    assert rare and any(a["category_id"] in rare for a in pseudo["annotations"])  # rare classes get pseudo boxes
    assert {a["image_id"] for a in pseudo["annotations"]} <= {img["id"] for img in pseudo["images"]}
    assert min(img["id"] for img in pseudo["images"]) > 2_000_000  # the ImageNet split's images, not train's
    assert set(result["prepare_time_s"]) >= {"regions", "pseudo_regions", "pseudo_labels"}
    wt_cfg = yaml.safe_load((tmp_path / "out" / "wt" / "config.yaml").read_text())
    stores = {src["dataset"]: Path(src["region_store"]).name for src in wt_cfg["data"]["sources"]}
    assert stores == {"ovshapes_lt_small_train_norare": "ovshapes_lt_small_train_norare",
                      "ovshapes_lt_small_pseudo": "ovshapes_lt_small_imagenet"}  # fmt: skip
    imagenet_store = RegionStore.open(tmp_path / "out" / "regions" / "ovshapes_lt_small_imagenet")
    assert (
        imagenet_store.metadata["num_images"] == 32
        and imagenet_store.metadata["dataset"] == "ovshapes_lt_small_imagenet"
    )
    wt = json.loads((tmp_path / "out" / "wt" / "eval" / "metrics.json").read_text())
    assert "APr" in wt["segm"] and "fidelity_cosine_novel" in wt


def test_an_ended_stage_is_reaped_even_before_its_exit_code_is_known():
    """A process's sentinel can be ready while ``exitcode`` is still None (not yet reaped): such a stage has
    ended and must be joined and reported, not taken for running (its time would then include whatever the
    pipeline does next)."""
    import multiprocessing

    from ovd.pipeline import _wait_for_exits

    class Ending:  # sentinel ready, exit code known only after join()
        def __init__(self) -> None:
            self.reader, self.writer = multiprocessing.Pipe(duplex=False)
            self.sentinel = self.reader
            self.exitcode = None

        def join(self) -> None:
            self.exitcode = 0

    ended, running_proc = Ending(), Ending()
    ended.writer.send(b"x")  # makes its sentinel ready
    running = {"a": (ended, 1.0), "b": (running_proc, 2.0)}
    assert _wait_for_exits(running) == [("a", ended, 1.0)]
    assert ended.exitcode == 0 and list(running) == ["b"] and running_proc.exitcode is None


def test_stage_processes_see_declared_datasets(tmp_path):
    """A dataset declared in one stage's config (`data.custom`) is registered in the pipeline's process
    and in every spawned stage process, including stages whose own config does not declare it."""
    from ovd.data.catalog import get_dataset

    files = {s: get_dataset(f"ovshapes_small_{s}") for s in ("train", "val")}  # generates the world
    declared = (
        "data.custom=["
        + ", ".join(
            f"{{name: mine_{s}, ann_file: '{info.ann_file_path}', image_root: '{info.image_root_path}', "
            "novel_classes: [heart, crescent, ring, lightning bolt, tree, key]}"
            for s, info in files.items()
        )
        + "]"
    )
    mine = [*FAST, "data.train=mine_train", "data.test=mine_val"]
    spec = {
        "parallel_stages": 2,
        "stages": [
            {"name": "a", "config": str(REPO / "configs/ovshapes/base.yaml"), "overrides": [*mine, declared]},
            {"name": "b", "config": str(REPO / "configs/ovshapes/base.yaml"), "overrides": mine},
        ],
        "demo_images": 0,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_pipeline(path, tmp_path / "out")
    rows = {r["stage"]: r for r in result["stages"]}
    assert rows["a"]["AP50_all"] == pytest.approx(rows["b"]["AP50_all"])  # same data, seed and recipe
    assert json.loads((tmp_path / "out" / "b" / "eval" / "metrics.json").read_text())["dataset"] == "mine_val"


def test_conflicting_declarations_are_an_error(tmp_path):
    def stage(name, ann):
        return {
            "name": name,
            "config": str(REPO / "configs/ovshapes/base.yaml"),
            "overrides": [*FAST, f"data.custom=[{{name: mine, ann_file: {ann}}}]"],
        }

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": [stage("a", "one.json"), stage("b", "two.json")]}))
    with pytest.raises(OVDError, match="'mine' is declared differently in stages 'a' and 'b'"):
        run_pipeline(path, tmp_path / "out")
