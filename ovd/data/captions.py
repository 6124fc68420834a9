"""Image-level labels from captions (PIS, METHOD §4.1, §10.16).

All captions of an image are joined and lower-cased; a class is a *tag* of the image when one of its
names (its name or a synonym, normalised: ``_`` → space, a ``(…)`` suffix cut) occurs in the text as
whole words. Images with no tag are dropped. The output is an image-label JSON: the caption file's
images with ``pos_category_ids`` (dataset category ids, all classes, novel ones included), the
categories with their synonyms, and no annotations.

Matching rule. The reference tests ``' ' + name + ' ' in text`` or ``text.startswith(name)`` or
``text.endswith(name)``. Here the text is first reduced to words (letters, digits and apostrophes;
everything else becomes one space), which keeps the reference's word-boundary semantics and also finds
a name before punctuation (``"a cat."``). With ``plurals`` (on by default), a name also matches in its
regular plural form: ``+s``, or ``+es`` after ``s``/``x``/``ch``/``sh``, and ``y`` → ``ies`` after a
consonant. Irregular plurals (``mice``, ``people``) must be listed as synonyms.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ovd.errors import OVDError

_NON_WORD = re.compile(r"[^a-z0-9']+")
_SUFFIX = re.compile(r"\s*\(.*\)\s*$")


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
    return " " + " ".join(_NON_WORD.sub(" ", text.lower()).split()) + " "


class CaptionTagger:
    """Finds the classes named in a text.

    Args:
        synonyms: ``{category_id: [name, synonym, ...]}``; names are normalised here.
        plurals: also match regular plural forms.
    """

    def __init__(self, synonyms: Mapping[int, Sequence[str]], *, plurals: bool = True) -> None:
        self.terms: dict[int, list[str]] = {}
        for cid, names in synonyms.items():
            forms = {normalize_name(n) for n in names} - {""}
            if plurals:
                forms |= {p for f in forms for p in plural_forms(f)}
            if not forms:
                raise OVDError(f"category {cid} has no usable name", field="synonyms")
            self.terms[int(cid)] = sorted(forms)

    def __call__(self, texts: Iterable[str]) -> list[int]:
        """Sorted category ids named in ``texts`` (joined, as all captions of one image)."""
        text = _words(" ".join(texts))
        return sorted(cid for cid, forms in self.terms.items() if any(f" {f} " in text for f in forms))


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


def tag_captions(
    captions: Mapping[str, Any],
    categories: Sequence[Mapping[str, Any]],
    *,
    synonyms: Mapping[int, Sequence[str]] | None = None,
    plurals: bool = True,
    path: str | None = None,
) -> dict[str, Any]:
    """COCO-captions JSON → image-label JSON with ``pos_category_ids`` (images without a tag dropped).

    Args:
        captions: ``{"images": [...], "annotations": [{"image_id", "caption"}, ...]}``.
        categories: the vocabulary (``id``, ``name``, optional ``synonyms``); written to the output.
        synonyms: overrides the categories' own names and synonyms.
        plurals: also match regular plurals.
        path: the captions file, for error messages.

    Returns:
        ``{"images": [image + pos_category_ids], "categories": [...], "annotations": []}``.
    """
    for key in ("images", "annotations"):
        if not isinstance(captions.get(key), list):
            raise OVDError(f"missing list {key!r} (not a COCO captions file?)", path=path, field=key)
    tagger = CaptionTagger(
        synonyms if synonyms is not None else category_synonyms(categories, path=path), plurals=plurals
    )
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
    return {"images": images, "categories": cats, "annotations": []}
