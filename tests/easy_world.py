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
    embeddings = folder / "separated_classes.npy"
    if not embeddings.is_file():
        gaussian = np.random.default_rng(0).standard_normal((64, template.num_classes + 1))
        basis = np.linalg.qr(gaussian)[0].T  # (C + 1, 64), orthonormal rows
        rows = (basis[0] + basis[1:]) / np.sqrt(2.0)  # (C, 64): unit norm, pairwise cosine 0.5
        np.save(embeddings, rows.astype(np.float32))
    return [*EASY_OVERRIDES, f"clip.embeddings={embeddings}"]
