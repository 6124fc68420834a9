"""Hash every generated file of the synthetic worlds (seed 0), to prove a refactor keeps them byte-identical.

Generates the OV-Shapes ``small`` and ``default`` presets, the OV-Shapes-LT ``small`` and ``default`` worlds
with their ImageNet splits, the caption tags / image labels of the catalog entries and 64 teacher crops under
OUT_DIR, then writes ``OUT_DIR.sha256`` (one ``sha256  path`` line per file) and prints the file count and
a digest of that listing. Run it on two trees and compare (docs/ARCHITECTURE.md records a run):

    PYTHONPATH=<tree> python benchmarks/hash_worlds.py /tmp/worlds_<tree>
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path


def main(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    os.environ["OVD_DATASETS"] = str(root)
    from ovd.data.catalog import get_dataset
    from ovd.data.ovshapes import generate_ovshapes, render_object_crops
    from ovd.data.ovshapes_lt import generate_imagenet_split, generate_ovshapes_lt

    for preset in ("small", "default"):
        generate_ovshapes(root, preset, seed=0, workers=1)
        generate_ovshapes_lt(root, preset, seed=0, workers=1)
        generate_imagenet_split(root, preset, seed=0)
    for name in ("ovshapes_small_captions", "ovshapes_captions", "ovshapes_lt_small_image_labels"):
        get_dataset(name)  # caption tags / image labels
    imgs, ids, caps = render_object_crops(64, 3)
    (root / "crops.bin").write_bytes(imgs.tobytes() + ids.tobytes() + "\n".join(caps).encode())
    total = hashlib.sha256()
    listing = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        total.update(f"{f.relative_to(root)} {h}\n".encode())
        listing.append(f"{h}  {f.relative_to(root)}")
    (root.parent / (root.name + ".sha256")).write_text("\n".join(listing) + "\n")
    return f"{len(listing)} files, total sha256 {total.hexdigest()}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder the worlds are generated in (OUT_DIR.sha256 beside it)")
    print(main(parser.parse_args().out_dir))
