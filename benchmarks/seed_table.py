"""Mean ± sample standard deviation of the same stage trained with several seeds, from the runs' own
``eval/metrics.json`` files (so that a multi-seed figure is computed, not averaged by hand).

Rows: one per run folder, then the mean ± std; columns: the OV-COCO metrics (AP50 novel / base / all, AP)
or, for LVIS-style metrics, box APr / APc / APf / AP and mask APr / AP.

Example:
    python benchmarks/seed_table.py /work/lt_w0/wt /work/lt_w1/wt /work/lt_w2/wt --output lt_wt_seeds.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import emit_report, header, row, table_header  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="stage folders (each with eval/metrics.json)")
    p.add_argument("--output", default="", help="markdown file to write")
    args = p.parse_args()
    from ovd.pipeline import LVIS_KEYS, METRIC_KEYS, stage_row
    from ovd.utils.io import read_json

    rows = [stage_row(str(run), read_json(run / "eval" / "metrics.json")) for run in args.runs]
    keys = LVIS_KEYS if "APr" in rows[0] else METRIC_KEYS
    lines = header("", "Computed from each run's eval/metrics.json.")
    lines += table_header(["run", *(k.replace("_", " ") for k in keys)], "l" + "r" * len(keys))
    for r in rows:
        lines.append(row(r["stage"], *("-" if r[k] is None else f"{r[k]:.1f}" for k in keys)))
    cells = []
    for k in keys:
        values = [r[k] for r in rows if r[k] is not None]
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}" if values else "-")
    lines.append(row(f"**mean ± sample std ({len(rows)} runs)**", *cells))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
