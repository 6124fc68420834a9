r"""Print the measured max differences of ovd's converted models from the detectron2 records, per quantity
and architecture (the table in this folder's README), in float64 (the parity records) and float32.

    PYTHONPATH=. python benchmarks/detectron2_parity/measure.py

Uses the parity tests' own functions (tests/compat/test_detectron2_parity.py) and fixtures.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {
    "c4": ("ovd_coco_r50_c4", ("coffee", "chelsea")),
    "c4_wt": ("ovd_coco_r50_c4_wt", ("chelsea",)),
    "fpn_mask": ("ovd_lvis_r50_fpn_mask", ("coffee",)),
    "fpn_mask_wt": ("ovd_lvis_r50_fpn_mask_wt", ("chelsea",)),
}


def main() -> int:
    spec = importlib.util.spec_from_file_location("parity", ROOT / "tests/compat/test_detectron2_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    rows = []
    for arch, (preset, images) in ARCHS.items():
        model, fix = parity.converted(arch, preset, torch.float64)
        model32, _ = parity.converted(arch, preset, torch.float32)
        for name in images:
            errs = parity.stage_errors(model, fix, name)
            e32 = parity.head_errors(model32, parity.run_stages(model32, parity._photo(name)), fix, f"float32/{name}")
            rows.append((f"{arch} / {name}", errs, e32))
        parity.converted.cache_clear()
    keys = list(parity.TOLERANCES) + ["det_iou", "mask_iou"]
    print("| quantity | tolerance (float64) | " + " | ".join(r[0] for r in rows) + " |")
    print("|---" * (len(rows) + 2) + "|")
    for k in keys:
        tol = parity.TOLERANCES.get(k, {"det_iou": f">= {parity.DET_IOU}", "mask_iou": f">= {parity.MASK_IOU}"}.get(k))
        fmt = ".6f" if k.endswith("iou") else ".1e"
        cells = [f"{r[1][k]:{fmt}}" if k in r[1] else "" for r in rows]
        print(f"| {k} | {tol} | " + " | ".join(cells) + " |")
    for k in parity.FLOAT32_TOLERANCES:
        cells = [f"{r[2][k]:.1e}" for r in rows]
        print(f"| float32 {k} (rounding) | {parity.FLOAT32_TOLERANCES[k]} | " + " | ".join(cells) + " |")
    cells = [f"{r[2]['det_iou']:.6f}" for r in rows]
    print(f"| float32 det_iou | >= {parity.DET_IOU} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
