"""OV-Shapes captions and prompts: text naming exactly the objects of an image, by name or synonym.

Captions hold no punctuation and mention every present class at least once in the singular, so the
METHOD §4.1 tagging rule (``' ' + synonym + ' '`` in the joined captions) finds exactly the objects present.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ovd.data.ovshapes_meta import CLASS_NAMES, CLASSES, plural
from ovd.errors import OVDError

_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PREFIXES = ("a picture of", "an image of", "a drawing of", "a scene with", "a synthetic image showing", "")
_CONNECTORS = ("and", "next to", "with", "beside", "as well as")
_BACKGROUND_WORDS = {
    "plain": ("a plain background", "a uniform background", "a flat background"),
    "gradient": ("a gradient background", "a shaded background", "a smooth gradient"),
    "noisy": ("a noisy background", "a mottled background", "a textured background"),
    "striped": ("a striped background", "stripes", "a background of stripes"),
}
_BACKGROUND_LINKS = ("on", "over", "against", "in front of")
PROMPT_TEMPLATES = (
    "a photo of a {colour} {term}",
    "a {colour} {term}",
    "a {term}",
    "a photo of a {term}",
    "a drawing of a {colour} {term}",
    "an image of a {term}",
    "the {colour} {term}",
    "{term}",
)


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _term(rng: np.random.Generator, class_id: int) -> str:
    cls = CLASSES[class_id]
    return cls.name if rng.random() < 0.5 else _pick(rng, cls.synonyms)


def caption_for(class_name: str, colour: str | None, rng: np.random.Generator) -> str:
    """A prompt-style caption of one object: ``"a photo of a red star"``, ``"a moon"``, ...

    The class is named by its name or a synonym; templates with a colour are skipped when ``colour``
    is ``None``. Articles follow the next word (``"an orange arrow"``).
    """
    if class_name not in CLASS_NAMES:
        raise OVDError(f"unknown OV-Shapes class {class_name!r} (valid: {', '.join(CLASS_NAMES)})")
    templates = [t for t in PROMPT_TEMPLATES if colour is not None or "{colour}" not in t]
    text = _pick(rng, templates).format(colour=colour, term=_term(rng, CLASS_NAMES.index(class_name)))
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _assemble(rng: np.random.Generator, phrases: list[str], background: str) -> str:
    words = [phrases[0]]
    for phrase in phrases[1:]:
        words += [_pick(rng, _CONNECTORS), phrase]
    prefix = _pick(rng, _PREFIXES)
    if prefix:
        words.insert(0, prefix)
    if rng.random() < 0.75:
        words += [_pick(rng, _BACKGROUND_LINKS), _pick(rng, _BACKGROUND_WORDS[background])]
    return " ".join(words)


def _enumerated_caption(rng: np.random.Generator, objects: list[tuple[int, str]], background: str) -> str:
    """Every object in the singular: ``"a red star next to a moon and another blue moon"``."""
    seen: set[int] = set()
    phrases = []
    for i in rng.permutation(len(objects)):
        class_id, colour = objects[i]
        head = f"{colour} {_term(rng, class_id)}" if rng.random() < 0.8 else _term(rng, class_id)
        phrases.append(f"another {head}" if class_id in seen else _with_article(head))
        seen.add(class_id)
    return _assemble(rng, phrases, background)


def _grouped_caption(rng: np.random.Generator, objects: list[tuple[int, str]], background: str) -> str:
    """Objects counted per class (and colour): ``"two blue moons and a red star"``."""
    by_colour = rng.random() < 0.7
    groups: dict[tuple[int, str], int] = {}
    for class_id, colour in objects:
        key = (class_id, colour if by_colour else "")
        groups[key] = groups.get(key, 0) + 1
    keys = list(groups)
    phrases = []
    for i in rng.permutation(len(keys)):
        (class_id, colour), count = keys[i], groups[keys[i]]
        noun = _term(rng, class_id) if count == 1 else plural(_term(rng, class_id))
        head = f"{colour} {noun}" if colour else noun
        phrases.append(_with_article(head) if count == 1 else f"{_COUNT_WORDS[count]} {head}")
    return _assemble(rng, phrases, background)


def make_captions(rng: np.random.Generator, objects: list[tuple[int, str]], background: str, n: int) -> list[str]:
    """``n`` captions naming exactly ``objects`` (``(class_id, colour)`` pairs); the first is enumerated."""
    return [
        (_enumerated_caption if i == 0 or rng.random() < 0.3 else _grouped_caption)(rng, objects, background)
        for i in range(n)
    ]
