"""Built-in datasets: OV-COCO (METHOD §6.1) and the synthetic OV-Shapes worlds.

:func:`register_all` is the catalog's registration hook (added by ``ovd/data/__init__.py``, run once at
the first lookup): this module imports the catalog and its entries, the catalog imports neither.
"""

from __future__ import annotations

from ovd.data.catalog import DatasetInfo, register_dataset

# The 80 COCO categories, (category id, name), sorted by id (the "oriorder" of METHOD §6.1).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

# OVR-CNN split (METHOD §6.1), as COCO category ids.
COCO_NOVEL_IDS: tuple[int, ...] = (5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87)
COCO_EXCLUDED_IDS: tuple[int, ...] = (10, 11, 13, 14, 37, 39, 40, 43, 46, 58, 64, 67, 77, 88, 89)


def _coco_split() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Contiguous (0..79) base and novel ids of OV-COCO."""
    ids = [cid for cid, _ in COCO_CATEGORIES]
    novel = tuple(ids.index(c) for c in COCO_NOVEL_IDS)
    base = tuple(i for i, c in enumerate(ids) if c not in COCO_NOVEL_IDS and c not in COCO_EXCLUDED_IDS)
    return base, novel


def register_coco() -> None:
    base, novel = _coco_split()
    names = tuple(n for _, n in COCO_CATEGORIES)
    cat_ids = tuple(c for c, _ in COCO_CATEGORIES)
    common = dict(class_names=names, category_ids=cat_ids, base_classes=base, novel_classes=novel)
    register_dataset(
        DatasetInfo(
            name="coco_ovd_train",
            image_root="coco/train2017",
            ann_file="coco/zero-shot/instances_train2017_seen_2_oriorder.json",
            extra={"cat_info": "coco/zero-shot/instances_train2017_seen_2_oriorder_cat_info.json"},
            **common,
        )
    )
    register_dataset(
        DatasetInfo(
            name="coco_ovd_val",
            image_root="coco/val2017",
            ann_file="coco/zero-shot/instances_val2017_all_2_oriorder.json",
            **common,
        )
    )
    register_dataset(
        DatasetInfo(
            name="coco_captions_train",  # caption tags: tools/tag_captions.py --dataset NAME (METHOD §4.1)
            image_root="coco/train2017",
            ann_file="coco/annotations/captions_train2017_tags_allcaps.json",
            ann_type="image",
            extra={"captions": "coco/annotations/captions_train2017.json", "synonyms": "coco"},
            **common,
        )
    )
    register_dataset(
        DatasetInfo(
            name="coco_captions_train_pseudo",  # tools/generate_pseudo_labels.py (the pipeline writes its own)
            image_root="coco/train2017",
            ann_file="coco/annotations/captions_train2017_tags_allcaps_pseudo.json",
            ann_type="pseudo",
            **common,
        )
    )


def register_all() -> None:
    """Register every built-in dataset (called once by the catalog)."""
    register_coco()
    from ovd.data.lvis import register_lvis

    register_lvis()
    from ovd.data import ovshapes

    ovshapes.register_ovshapes()
    from ovd.data.ovshapes_lt import register_ovshapes_lt

    register_ovshapes_lt()
