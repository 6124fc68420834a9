"""An easy OV-Shapes world for end-to-end tests with floors: a handful of images with a few large,
well-separated shapes and no clutter, which a tiny detector overfits within seconds.

Two datasets over the same images (the val split of the world, so every object is annotated):
``ovshapes_easy_boxes`` holds only the base-class boxes (novel objects are unannotated background, the
OV-COCO training protocol) and ``ovshapes_easy_all`` holds every box (evaluation: base and novel AP50).
A model trained on the first and evaluated on the second must reach a high base AP50 (it saw those boxes)
and a low novel AP50 (it was taught that novel shapes are background)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ovd.data.catalog import get_dataset, register_dataset
from ovd.data.ovshapes import OVShapesPreset, generate_ovshapes

EASY = OVShapesPreset(
    "easy",
    num_train=1,  # unused: the val split (all objects annotated) is both training and test set
    num_val=8,
    image_size=(128, 128),
    objects_per_image=(2, 4),
    object_size=(40.0, 64.0),
    clutter_per_image=(0, 0),
    max_box_iou=0.0,
    max_occlusion=0.0,
)
TRAIN, TEST = "ovshapes_easy_boxes", "ovshapes_easy_all"

# Overrides of configs/ovshapes/base.yaml for overfitting the easy world (the floors of the tests that
# use it were measured with these: change them and re-measure).
EASY_OVERRIDES = [
    f"data.train={TRAIN}",
    f"data.test={TEST}",
    "data.num_workers=0",
    "clip.pretrained=",  # random-init tiny CLIP: no weights needed (class embeddings: see below)
    "solver.ims_per_batch=2",
    "solver.warmup_iters=5",
    "solver.clip_grad_norm=10.0",
    "input.min_size_train=[128]",
    "input.min_size_train_sampling=choice",
    "input.max_size_train=128",
    "input.min_size_test=128",
    "input.max_size_test=128",
    "model.rpn.post_nms_top_n_test=50",
    "log_period=5",
]


def register_easy_world(root: Path) -> list[str]:
    """Generate the easy world under ``root`` (once), register its two datasets and return the overrides
    that train on it: :data:`EASY_OVERRIDES` plus ``clip.embeddings``, well-separated class embeddings.

    Every pair of classes at cosine 0.5 (a shared direction plus orthonormal class directions, like real
    CLIP text embeddings, which share a large common part) instead of the random-init tiny CLIP's text
    embeddings, whose classes are nearly parallel (mean pairwise cosine 0.87, up to 0.98): the tiny runs
    could hardly tell the classes apart (base AP50 0-4), so no floor could separate working from broken.
    """
    folder = generate_ovshapes(root, EASY, seed=0, workers=1)
    template = get_dataset("ovshapes_small_val", prepare=False)  # vocabulary and base / novel split
    data = json.loads((folder / "annotations" / "val.json").read_text())
    novel_ids = {template.category_ids[k] for k in template.novel_classes}
    base_only = dict(data, annotations=[a for a in data["annotations"] if a["category_id"] not in novel_ids])
    boxes = folder / "annotations" / "val_base_only.json"
    if not boxes.is_file():
        boxes.write_text(json.dumps(base_only))
    images = str(folder / "val")
    register_dataset(
        replace(template, name=TRAIN, image_root=images, ann_file=str(boxes), prepare=None), overwrite=True
    )
    register_dataset(
        replace(
            template, name=TEST, image_root=images, ann_file=str(folder / "annotations" / "val.json"), prepare=None
        ),
        overwrite=True,
    )
    return [*EASY_OVERRIDES, f"clip.embeddings={_separated_classes(folder, template.num_classes)}"]


def _separated_classes(folder: Path, num_classes: int) -> Path:
    """``folder/separated_classes.npy`` (written once): ``(C, 64)`` float32 class embeddings, unit norm, every
    pair at cosine 0.5."""
    path = folder / "separated_classes.npy"
    if not path.is_file():
        gaussian = np.random.default_rng(0).standard_normal((64, num_classes + 1))
        basis = np.linalg.qr(gaussian)[0].T  # (C + 1, 64), orthonormal rows
        np.save(path, ((basis[0] + basis[1:]) / np.sqrt(2.0)).astype(np.float32))  # shared part + one direction each
    return path


# The PIS / weight-transfer / LVIS floors: one or two shapes per image, split by image so that no box image
# holds a novel shape (the novel classes are never background there) and every image holding a novel shape
# is a pseudo-box image (its objects' true boxes as pseudo boxes: perfect PIS output, the upper bound a
# working pseudo-label step approaches). A box-only run cannot name the novel shapes; a run whose pseudo
# boxes reach the classifier must.
EASY_PIS = OVShapesPreset(
    "easy_pis",
    num_train=1,  # unused, as for EASY
    num_val=24,
    image_size=(128, 128),
    objects_per_image=(1, 2),
    object_size=(40.0, 56.0),
    clutter_per_image=(0, 0),
    max_box_iou=0.0,
    max_occlusion=0.0,
)
PIS_BOXES, PIS_PSEUDO, PIS_TEST = "ovshapes_easy_pis_boxes", "ovshapes_easy_pis_pseudo", "ovshapes_easy_pis_all"


def pis_names(lvis: bool = False) -> tuple[str, str, str]:
    """The registered names of the box, pseudo-box and test datasets (``_lvis`` for the LVIS-style ones)."""
    suffix = "_lvis" if lvis else ""
    return tuple(n + suffix for n in (PIS_BOXES, PIS_PSEUDO, PIS_TEST))


def pis_sources(lvis: bool = False) -> str:
    """Box + pseudo-box batches, one of each kind per step."""
    boxes, pseudo, _ = pis_names(lvis)
    return (
        f"data.sources=[{{dataset: {boxes}, batch_size: 2, ratio: 1}},"
        f" {{dataset: {pseudo}, supervision: pseudo, batch_size: 2, ratio: 1, min_size: [128], max_size: 128}}]"
    )


# Lengths of the floor tests' runs (tests/engine/test_method_floors_e2e.py; benchmarks/e2e_floors.py measures
# the same runs): change one and re-measure its floors.
PIS_ITERATIONS = 400
WT_ITERATIONS = 600  # from the PIS weights; 300 measured too short (its random fc1-fc4 first undo both)
LVIS_ITERATIONS = 600


def schedule(iterations: int) -> list[str]:
    """``iterations`` steps, the learning rate divided by 10 for the last quarter: the runs settle, so the
    numbers a floor is checked against move less from one evaluation to the next."""
    return [f"solver.max_iter={iterations}", f"solver.steps=[{iterations * 3 // 4}]"]


# the weight-transfer stage on top of a PIS run (its random fc1-fc4 need the longer warm-up, as on OV-Shapes-LT)
WT_OVERRIDES = [
    "solver.warmup_iters=100",
    "model.classifier.weight_transfer=true",
    "model.classifier.weight_transfer_hidden_dim=32",
]
# configs/ovshapes_lt/base.yaml (Mask R-CNN, federated sigmoid classifier) at test size
LVIS_OVERRIDES = ["model.roi_heads.detections_per_image=20", "model.mask.conv_dim=16"]


def _lvis_fields(data: dict, novel_ids: set[int]) -> dict:
    """``data`` made LVIS-style: novel classes rare, base classes alternately common / frequent, every image
    exhaustively annotated (each absent class a verified negative)."""
    base = sorted(c["id"] for c in data["categories"] if c["id"] not in novel_ids)
    freq = {i: ("r" if i in novel_ids else "cf"[base.index(i) % 2]) for i in (c["id"] for c in data["categories"])}
    present: dict[int, set[int]] = {}
    for a in data["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    images = [
        dict(img, neg_category_ids=sorted(set(freq) - present.get(img["id"], set())), not_exhaustive_category_ids=[])
        for img in data["images"]
    ]
    cats = [dict(c, frequency=freq[c["id"]]) for c in data["categories"]]
    return dict(data, images=images, categories=cats)


def register_easy_pis_world(root: Path, lvis: bool = False) -> list[str]:
    """Generate the PIS world under ``root`` (once) and register ``PIS_BOXES`` (the images without a novel
    shape, their base boxes), ``PIS_PSEUDO`` (the other images, every object a pseudo box of score 1) and
    ``PIS_TEST`` (all images, all boxes); with ``lvis`` the three are LVIS-style (masks, federated metric,
    novel = rare) and named with ``_lvis`` (:func:`pis_names`). Returns :data:`EASY_OVERRIDES` on them plus
    the separated class embeddings."""
    from ovd.data import lvis as lvis_data

    folder = generate_ovshapes(root, EASY_PIS, seed=0, workers=1)
    template = get_dataset("ovshapes_small_val", prepare=False)
    data = json.loads((folder / "annotations" / "val.json").read_text())
    novel_ids = {template.category_ids[k] for k in template.novel_classes}
    with_novel = {a["image_id"] for a in data["annotations"] if a["category_id"] in novel_ids}
    labels: dict[int, list[int]] = {}
    for a in data["annotations"]:
        labels.setdefault(a["image_id"], []).append(a["category_id"])
    images = [dict(img, pos_category_ids=sorted(set(labels.get(img["id"], [])))) for img in data["images"]]

    def subset(keep: set[int], **fields) -> dict:
        anns = [dict(a, **fields) for a in data["annotations"] if a["image_id"] in keep]
        return dict(data, images=[i for i in images if i["id"] in keep], annotations=anns)

    every = {img["id"] for img in data["images"]}
    boxes, pseudo, test = pis_names(lvis)
    splits = {
        boxes: (subset(every - with_novel), "box"),
        pseudo: (subset(with_novel, score=1.0), "pseudo"),
        test: (subset(every), "box"),
    }
    extra = {}
    if lvis:
        splits = {k: (_lvis_fields(d, novel_ids), t) for k, (d, t) in splits.items()}
        cat_info = folder / "annotations" / f"{boxes}_cat_info.json"
        cat_info.write_text(json.dumps(lvis_data.category_info(splits[boxes][0])))
        extra = {"format": "lvis", "masks": "true", "cat_info": str(cat_info)}
    for name, (content, ann_type) in splits.items():
        path = folder / "annotations" / f"{name}.json"
        path.write_text(json.dumps(content))
        info = replace(
            template, name=name, image_root=str(folder / "val"), ann_file=str(path), ann_type=ann_type, prepare=None
        )
        if lvis:
            info = replace(info, extra=dict(extra), evaluator="lvis")
        register_dataset(info, overwrite=True)
    embeddings = _separated_classes(folder, template.num_classes)
    overrides = [o for o in EASY_OVERRIDES if not o.startswith(("data.train=", "data.test="))]
    return [*overrides, f"data.train={boxes}", f"data.test={test}", f"clip.embeddings={embeddings}"]
