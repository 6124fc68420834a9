"""The one dataset registry: name → where the files are and what the classes mean.

Paths in the catalog are relative to the datasets root, ``$OVD_DATASETS`` (default ``datasets/``
under the current directory), unless absolute. A dataset may carry a ``prepare`` callable that
generates its files when they are missing (the built-in synthetic worlds).

The catalog imports none of its entries: modules that define datasets register them through
:func:`add_registration_hook`, whose hooks run once, at the first lookup (``ovd/data/__init__.py``
adds the built-ins' hook, :func:`ovd.data.builtin.register_all`), so imports run one way.

``ann_type`` is ``"box"`` (boxes of every annotated class), ``"image"`` (image-level labels only,
``pos_category_ids``) or ``"pseudo"`` (PIS pseudo boxes: one box per image-level label, METHOD §4.1).
``evaluator`` names the metric a box dataset is scored with: ``"coco_ovd"`` or ``"lvis"``
(:func:`ovd.evaluation.evaluator.build_evaluator`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ovd.errors import OVDError

DATASETS_ENV = "OVD_DATASETS"
_DEFAULT_ROOT = "datasets"


def datasets_root() -> Path:
    """The datasets root: ``$OVD_DATASETS`` or ``./datasets``."""
    return Path(os.environ.get(DATASETS_ENV, _DEFAULT_ROOT))


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one registered dataset.

    Attributes:
        name: the catalog name, e.g. ``"coco_ovd_val"``.
        image_root: folder the annotation's ``file_name`` entries are relative to.
        ann_file: COCO-format annotation JSON (boxes) or image-label JSON (``pos_category_ids``).
        class_names: the vocabulary in contiguous-id order (``C`` names).
        category_ids: dataset category id of each contiguous id (``C`` ids).
        base_classes: contiguous ids of classes trained with boxes.
        novel_classes: contiguous ids of held-out classes evaluated as novel.
        ann_type: ``"box"``, ``"image"`` (image-level labels only) or ``"pseudo"`` (pseudo boxes).
        prepare: optional ``prepare(info) -> None`` that writes the files when missing.
        extra: free-form metadata (caption file, synonyms file, split preset, ...).
        evaluator: the metric it is scored with: ``"coco_ovd"`` (novel / base AP50) or ``"lvis"``
            (federated, APr / APc / APf); see :mod:`ovd.evaluation.evaluator`.
    """

    name: str
    image_root: str
    ann_file: str
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    base_classes: tuple[int, ...] = ()
    novel_classes: tuple[int, ...] = ()
    ann_type: str = "box"
    prepare: Callable[[DatasetInfo], None] | None = field(default=None, compare=False, repr=False)
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    evaluator: str = "coco_ovd"

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.category_ids):
            raise OVDError(
                f"{len(self.class_names)} class names but {len(self.category_ids)} category ids",
                field=f"catalog[{self.name}]",
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def resolve(self, path: str) -> Path:
        """A catalog path made absolute against the datasets root."""
        p = Path(path)
        return p if p.is_absolute() else datasets_root() / p

    @property
    def image_root_path(self) -> Path:
        return self.resolve(self.image_root)

    @property
    def ann_file_path(self) -> Path:
        return self.resolve(self.ann_file)


_CATALOG: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo, *, overwrite: bool = False) -> None:
    """Add a dataset to the catalog; re-registering a name needs ``overwrite=True``."""
    if info.name in _CATALOG and not overwrite:
        raise OVDError(f"dataset {info.name!r} is already registered")
    _CATALOG[info.name] = info


def list_datasets() -> list[str]:
    _ensure_builtins()
    return sorted(_CATALOG)


def get_dataset(name: str, *, prepare: bool = True) -> DatasetInfo:
    """Look a dataset up by name; generates it first if it has a ``prepare`` hook and is missing.

    Raises:
        OVDError: the name is unknown (the message lists the closest registered names).
    """
    _ensure_builtins()
    if name not in _CATALOG:
        close = difflib.get_close_matches(name, list(_CATALOG), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise OVDError(f"unknown dataset {name!r}{hint} (registered: {', '.join(list_datasets())})")
    info = _CATALOG[name]
    if prepare and info.prepare is not None and not info.ann_file_path.is_file():
        info.prepare(info)
    return info


def with_paths(info: DatasetInfo, *, image_root: str, ann_file: str) -> DatasetInfo:
    """A copy of ``info`` pointing at other files (e.g. a generated fixture)."""
    return replace(info, image_root=image_root, ann_file=ann_file)


_HOOKS: list[Callable[[], None]] = []
_HOOKS_RUN = False


def add_registration_hook(hook: Callable[[], None]) -> None:
    """Have ``hook()`` register its datasets at the first lookup (at once if lookups already ran)."""
    _HOOKS.append(hook)
    if _HOOKS_RUN:
        hook()


def ensure_registered() -> None:
    """Run the registration hooks once (plain function calls, no import-time scanning)."""
    global _HOOKS_RUN
    if _HOOKS_RUN:
        return
    _HOOKS_RUN = True
    for hook in _HOOKS:
        hook()


_ensure_builtins = ensure_registered  # the name the lookups call
