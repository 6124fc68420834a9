"""Image-level labels from captions (PIS, METHOD §4.1, §10.16).

All captions of an image are joined and lower-cased; a class is a *tag* of the image when one of its
names (its name or a synonym, normalised: ``_`` → space, a ``(…)`` suffix cut) occurs in the text as
whole words. Images with no tag are dropped. The output is an image-label JSON: the caption file's
images with ``pos_category_ids`` (dataset category ids, all classes, novel ones included), the
categories with their synonyms, and no annotations.

Matching rule. The reference tests ``' ' + name + ' ' in text`` or ``text.startswith(name)`` or
``text.endswith(name)``. Here the text is first reduced to words (letters, digits and apostrophes;
everything else becomes one space) and padded with a space on each side, and then ``' ' + name + ' '``
is searched. That keeps the reference's word-boundary semantics (``"cat"`` is not found in
``"category"`` or ``"concatenate"``) and also finds a name before punctuation (``"a cat."``), which the
reference misses.

Longest match. With ``longest_match`` (on by default), a name found in the text is masked before
shorter names are searched, so ``"hot dog"`` does not also tag *dog*, ``"teddy bear"`` *bear*, or
``"baseball bat"`` the ball's synonym ``"baseball"``. The reference has no such rule (it tags both);
``longest_match=False`` reproduces it. Names are tried by decreasing number of words, then length.

Plurals. With ``plurals`` (on by default), a name also matches in its regular plural form, made from
its last word (:func:`plural_forms`): ``+es`` after ``s``/``x``/``ch``/``sh``, ``y`` → ``ies`` after a
consonant, else ``+s``. Irregular plurals (``mice``, ``people``) must be listed as synonyms, as the
packaged COCO table does. OV-Shapes captions make their plurals with
:func:`ovd.data.ovshapes.plural`, which this rule reproduces for every OV-Shapes term.

Synonym tables (``{category id: [name, synonym, ...]}``): :func:`coco_synonyms` (the packaged
``metadata/coco_synonyms.json``) and :func:`ovshapes_synonyms`; :func:`synonym_table` looks one up by
name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ovd.errors import OVDError

logger = logging.getLogger(__name__)

_NON_WORD = re.compile(r"[^a-z0-9']+")
_SUFFIX = re.compile(r"\s*\(.*\)\s*$")
_MASK = "|"  # replaces a matched name: never part of a word, so no other name matches across it
_COCO_SYNONYMS = Path(__file__).parent / "metadata" / "coco_synonyms.json"


def normalize_name(name: str) -> str:
    """``"Hot_dog (food)"`` → ``"hot dog"``: lower case, ``_`` → space, a ``(…)`` suffix cut, words only."""
    text = _SUFFIX.sub("", name.replace("_", " ").lower())
    return " ".join(_NON_WORD.sub(" ", text).split())


def plural_forms(name: str) -> list[str]:
    """The regular plural of a normalised name's last word (see the module docstring)."""
    if not name:
        return []
    if name.endswith(("s", "x", "ch", "sh")):
        return [name + "es"]
    if len(name) > 1 and name.endswith("y") and name[-2] not in "aeiou":
        return [name[:-1] + "ies"]
    return [name + "s"]


def _words(text: str) -> str:
    """``"A cat, on a MAT."`` → ``" a cat on a mat "``."""
    return " " + " ".join(_NON_WORD.sub(" ", text.lower()).split()) + " "


class CaptionTagger:
    """Finds the classes named in a text.

    Args:
        synonyms: ``{category_id: [name, synonym, ...]}``; names are normalised here.
        plurals: also match regular plural forms.
        longest_match: mask a found name before searching shorter ones (see the module docstring).
    """

    def __init__(
        self, synonyms: Mapping[int, Sequence[str]], *, plurals: bool = True, longest_match: bool = True
    ) -> None:
        self.longest_match = longest_match
        self.terms: dict[int, list[str]] = {}
        for cid, names in synonyms.items():
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise OVDError(f"category {cid}: expected a list of names", field=f"synonyms[{cid}]")
            forms = {normalize_name(n) for n in names} - {""}
            if plurals:
                forms |= {p for f in forms for p in plural_forms(f)}
            if not forms:
                raise OVDError(f"category {cid} has no usable name", field=f"synonyms[{cid}]")
            self.terms[int(cid)] = sorted(forms)
        pairs = [(form, cid) for cid, forms in self.terms.items() for form in forms]
        pairs.sort(key=lambda p: (-p[0].count(" "), -len(p[0]), p[0], p[1]))  # longest first
        self._search = [(f" {form} ", re.compile(rf"(?<= ){re.escape(form)}(?= )"), cid) for form, cid in pairs]

    def __call__(self, texts: Iterable[str]) -> list[int]:
        """Sorted category ids named in ``texts`` (joined, as all captions of one image)."""
        text = _words(" ".join(texts))
        found = set()
        for needle, pattern, cid in self._search:
            if needle in text:
                found.add(cid)
                if self.longest_match:
                    text = pattern.sub(_MASK, text)
        return sorted(found)


def category_synonyms(categories: Sequence[Mapping[str, Any]], *, path: str | None = None) -> dict[int, list[str]]:
    """``{id: [name, *synonyms]}`` from COCO/LVIS-style categories (``synonyms`` optional)."""
    out: dict[int, list[str]] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
            raise OVDError("a category needs 'id' and 'name'", path=path, field=f"categories[{i}]")
        syn = cat.get("synonyms") or []
        if not isinstance(syn, list) or not all(isinstance(s, str) for s in syn):
            raise OVDError("synonyms must be a list of strings", path=path, field=f"categories[{i}].synonyms")
        out[int(cat["id"])] = [str(cat["name"]), *syn]
    return out


def coco_synonyms() -> dict[int, list[str]]:
    """``{COCO category id: [name, synonyms...]}`` of the 80 COCO classes (``metadata/coco_synonyms.json``).

    The class name comes first; the synonyms follow the LVIS synonyms of each COCO synset and add
    common caption words (``man``, ``woman``, ``child`` for person) and irregular plurals.
    """
    from ovd.utils.io import read_json

    raw = read_json(_COCO_SYNONYMS)
    table = raw.get("synonyms") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise OVDError("expected {'synonyms': {category_id: [names]}}", path=_COCO_SYNONYMS, field="synonyms")
    return {int(k): list(v) for k, v in table.items()}


def ovshapes_synonyms() -> dict[int, list[str]]:
    """``{OV-Shapes category id (1..K): [name, synonyms...]}`` from :data:`ovd.data.ovshapes_meta.CLASSES`."""
    from ovd.data.ovshapes_meta import synonyms

    return synonyms()


SYNONYM_TABLES: dict[str, Callable[[], dict[int, list[str]]]] = {
    "coco": coco_synonyms,
    "ovshapes": ovshapes_synonyms,
}


def synonym_table(name: str) -> dict[int, list[str]]:
    """A packaged synonym table by name (``"coco"`` or ``"ovshapes"``)."""
    if name not in SYNONYM_TABLES:
        raise OVDError(f"unknown synonym table {name!r}; choose one of {', '.join(SYNONYM_TABLES)}", field="synonyms")
    return SYNONYM_TABLES[name]()


def _restrict_synonyms(
    synonyms: Mapping[int, Sequence[str]], categories: Sequence[Mapping[str, Any]], path: str | None
) -> dict[int, Sequence[str]]:
    """The table's entries of the categories (a table may cover more classes than the vocabulary)."""
    table = {int(k): v for k, v in synonyms.items()}
    ids = [int(c["id"]) for c in categories]
    missing = [cid for cid in ids if cid not in table]
    if missing:
        raise OVDError(f"the synonym table has no names for category ids {missing[:10]}", path=path, field="synonyms")
    return {cid: table[cid] for cid in ids}


def tag_captions(
    captions: Mapping[str, Any],
    categories: Sequence[Mapping[str, Any]],
    *,
    synonyms: Mapping[int, Sequence[str]] | None = None,
    plurals: bool = True,
    longest_match: bool = True,
    path: str | None = None,
) -> dict[str, Any]:
    """COCO-captions JSON → image-label JSON with ``pos_category_ids`` (images without a tag dropped).

    Args:
        captions: ``{"images": [...], "annotations": [{"image_id", "caption"}, ...]}``.
        categories: the vocabulary (``id``, ``name``, optional ``synonyms``); written to the output.
        synonyms: ``{category id: [name, synonym, ...]}`` covering every id of ``categories`` (other
            ids are ignored); replaces the categories' own names and synonyms (and is written as
            their ``synonyms``).
        plurals: also match regular plurals.
        longest_match: a found name hides the shorter names inside it (``"hot dog"`` is not *dog*).
        path: the captions file, for error messages.

    Returns:
        ``{"images": [image + pos_category_ids], "categories": [...], "annotations": []}``; the tags
        of an image are sorted category ids.

    Raises:
        OVDError: a malformed captions file, category or synonym table (naming the field).
    """
    if not isinstance(captions, Mapping):
        raise OVDError("expected a COCO captions object", path=path, field="<top level>")
    for key in ("images", "annotations"):
        if not isinstance(captions.get(key), list):
            raise OVDError(f"missing list {key!r} (not a COCO captions file?)", path=path, field=key)
    own = category_synonyms(categories, path=path)  # also checks the categories
    if synonyms is not None:
        synonyms = _restrict_synonyms(synonyms, categories, path)
    tagger = CaptionTagger(synonyms if synonyms is not None else own, plurals=plurals, longest_match=longest_match)
    texts: dict[int, list[str]] = {}
    for i, ann in enumerate(captions["annotations"]):
        if not isinstance(ann, Mapping) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise OVDError("a caption needs 'image_id' and a string 'caption'", path=path, field=f"annotations[{i}]")
        texts.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    images = []
    for i, img in enumerate(captions["images"]):
        if not isinstance(img, Mapping) or "id" not in img:
            raise OVDError("an image needs an 'id'", path=path, field=f"images[{i}]")
        tags = tagger(texts.get(int(img["id"]), []))
        if tags:
            images.append({**img, "pos_category_ids": tags})
    cats = [
        {**c, "synonyms": list(dict.fromkeys(synonyms[int(c["id"])]))} if synonyms is not None else dict(c)
        for c in categories
    ]
    logger.info("%d of %d images have a caption tag", len(images), len(captions["images"]))
    return {"images": images, "categories": cats, "annotations": []}


def tag_counts(data: Mapping[str, Any]) -> dict[int, int]:
    """``{category id: number of images tagged with it}`` of an image-label JSON (every category listed)."""
    counts = {int(c["id"]): 0 for c in data.get("categories", [])}
    for img in data["images"]:
        for cid in img["pos_category_ids"]:
            counts[int(cid)] = counts.get(int(cid), 0) + 1
    return counts
