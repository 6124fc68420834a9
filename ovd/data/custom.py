"""Your own COCO-format datasets, declared in the config (``data.custom``) instead of in Python.

Each entry names an annotation file and an image folder; the vocabulary is read from the file's
``categories`` (contiguous ids in category-id order, as for every dataset of the catalog) and the
classes listed in ``novel_classes`` are held out as novel (their boxes are evaluated separately; a
training set should not contain them). ``evaluator`` names the metric it is scored with: ``coco_ovd``
(the default: novel / base AP50) or ``lvis`` (an LVIS-format file: APr / APc / APf from the categories'
``frequency``). Entries are registered in the catalog by
:func:`register_custom_datasets`, which the trainer, the evaluator and the pipeline call first, so a
stage process, a resumed run or ``--eval-only`` sees the same datasets as the run that wrote its config.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ovd.data.catalog import DatasetInfo, ensure_registered, list_datasets, register_dataset
from ovd.errors import OVDError
from ovd.utils.io import read_json

if TYPE_CHECKING:
    from ovd.config import CustomDatasetCfg

ANN_TYPES = ("box", "image", "pseudo")
# the names of ovd.evaluation.evaluator.EVALUATORS (data sits below evaluation; a test keeps them equal)
EVALUATORS = ("coco_ovd", "lvis")
# name -> the entry it was registered from: a config's dataset may be re-declared with other settings, and
# re-declaring it with the same ones (every stage and evaluation of a run) does not read its file again
_CUSTOM: dict[str, CustomDatasetCfg] = {}


def custom_dataset_info(spec: CustomDatasetCfg, index: int = 0) -> DatasetInfo:
    """The catalog entry of one ``data.custom`` item (reads the annotation file's categories).

    Raises:
        OVDError: an empty name, an unknown ``ann_type`` or ``evaluator``, a missing or malformed annotation file, no
            categories, or a novel class name that is not among them (the message names the field).
    """
    where = f"data.custom[{index}]"
    if not spec.name:
        raise OVDError("empty dataset name", field=f"{where}.name")
    if spec.ann_type not in ANN_TYPES:
        raise OVDError(f"unknown ann_type {spec.ann_type!r} (valid: {', '.join(ANN_TYPES)})", field=f"{where}.ann_type")
    if spec.evaluator not in EVALUATORS:
        raise OVDError(
            f"dataset {spec.name!r}: unknown evaluator {spec.evaluator!r} (valid: {', '.join(EVALUATORS)})",
            field=f"{where}.evaluator",
        )
    if not spec.ann_file:
        raise OVDError("no annotation file given", field=f"{where}.ann_file")
    probe = DatasetInfo(spec.name, spec.image_root, spec.ann_file, (), ())
    data = read_json(probe.ann_file_path)  # OVDError naming the file when missing or malformed
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise OVDError("no 'categories' list of {id, name} objects", path=str(probe.ann_file_path), field="categories")
    cats = sorted(cats, key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    if len(set(names)) != len(names):
        raise OVDError("duplicate category names", path=str(probe.ann_file_path), field="categories")
    novel = []
    for name in spec.novel_classes:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise OVDError(f"novel class {name!r} is not a category of {probe.ann_file_path}{hint}",
                           field=f"{where}.novel_classes")  # fmt: skip
        novel.append(names.index(name))
    return DatasetInfo(
        name=spec.name,
        image_root=spec.image_root,
        ann_file=spec.ann_file,
        class_names=tuple(names),
        category_ids=tuple(int(c["id"]) for c in cats),
        base_classes=tuple(i for i in range(len(names)) if i not in set(novel)),
        novel_classes=tuple(sorted(novel)),
        ann_type=spec.ann_type,
        evaluator=spec.evaluator,
    )


def register_custom_datasets(specs: Sequence[CustomDatasetCfg]) -> list[str]:
    """Register every ``data.custom`` entry in the catalog; returns their names.

    Raises:
        OVDError: an invalid entry (see :func:`custom_dataset_info`), two entries with one name, or a
            name that a built-in dataset already uses.
    """
    ensure_registered()
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise OVDError(f"dataset {spec.name!r} is declared twice", field=f"data.custom[{i}].name")
        seen.add(spec.name)
        registered = spec.name in list_datasets()
        if registered and spec.name not in _CUSTOM:
            raise OVDError(f"{spec.name!r} is a built-in dataset; choose another name", field=f"data.custom[{i}].name")
        if registered and _CUSTOM[spec.name] == spec:
            continue  # already in the catalog from this very entry
        register_dataset(custom_dataset_info(spec, i), overwrite=True)
        _CUSTOM[spec.name] = spec
    return sorted(seen)
