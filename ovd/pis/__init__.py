"""Pseudo image-level supervision (PIS, METHOD §4): pseudo boxes for image-level labels."""

from ovd.pis.pseudo_labels import (
    ClipScoredProposals,
    FileBoxes,
    PseudoBoxSource,
    generate_pseudo_labels,
    pseudo_label_json,
)

__all__ = ["ClipScoredProposals", "FileBoxes", "PseudoBoxSource", "generate_pseudo_labels", "pseudo_label_json"]
