"""Pseudo image-level supervision (PIS, METHOD §4): pseudo boxes for image-level labels."""

from ovd.pis.pseudo_labels import (
    ClipScoredProposals,
    FileBoxes,
    PseudoBoxes,
    PseudoBoxSource,
    generate_pseudo_labels,
    image_label_info,
    pseudo_label_json,
)

__all__ = [
    "ClipScoredProposals",
    "FileBoxes",
    "PseudoBoxSource",
    "PseudoBoxes",
    "generate_pseudo_labels",
    "image_label_info",
    "pseudo_label_json",
]
