"""Compare two pipeline output folders stage by stage: are the results of a refactor identical?

For every stage folder present in both runs (a folder with ``eval/metrics.json``), it compares every
number of ``metrics.json`` exactly and the weights of ``model_final.pth`` bit for bit (tensors only: the
stored config text may name fields a later schema added). Exit status 0 when everything is identical.

    python benchmarks/compare_runs.py /work/before/seed0 /work/after/seed0 --output identical.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import emit_report, header, row, table_header  # noqa: E402


def flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number of nested metrics (dicts and lists, e.g. the per-class rows), keyed by its dotted path."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= flat_numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out |= flat_numbers(v, f"{prefix}{i}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def compare_stage(a: Path, b: Path) -> tuple[int, list[str], int, list[str], dict[str, float]]:
    """(numbers compared, differing metric keys, tensors compared, differing tensor keys, a's metrics)."""
    import torch

    from ovd.utils.io import read_json

    ma, mb = flat_numbers(read_json(a / "eval/metrics.json")), flat_numbers(read_json(b / "eval/metrics.json"))
    keys = sorted(set(ma) | set(mb))
    metric_diff = [k for k in keys if ma.get(k) != mb.get(k)]
    wa = torch.load(a / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    names = sorted(set(wa) | set(wb))
    weight_diff = [k for k in names if k not in wa or k not in wb or not torch.equal(wa[k], wb[k])]
    return len(keys), metric_diff, len(names), weight_diff, ma


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--output", default="", help="markdown file to write")
    p.add_argument("--note", default="", help="a line saying what the two runs are (e.g. their commits)")
    args = p.parse_args()
    stages = sorted(
        d.name
        for d in args.before.iterdir()
        if (d / "eval/metrics.json").is_file() and (args.after / d.name / "eval/metrics.json").is_file()
    )
    if not stages:
        print(f"no stage with eval/metrics.json in both {args.before} and {args.after}", file=sys.stderr)
        return 2
    details = f"{args.before} vs {args.after}" + (f": {args.note}" if args.note else "")
    lines = header("Identical results before and after", details)
    lines += table_header(
        ["stage", "AP50 novel / base / all", "numbers", "differing", "tensors", "differing"], "lrrrrr"
    )
    same = True
    for stage in stages:
        n, mdiff, t, wdiff, m = compare_stage(args.before / stage, args.after / stage)
        same &= not mdiff and not wdiff
        ap = " / ".join(f"{m.get(k, float('nan')):.2f}" for k in ("AP50_novel", "AP50_base", "AP50_all"))
        lines.append(row(stage, ap, n, ", ".join(mdiff) or 0, t, ", ".join(wdiff[:3]) or 0))
    lines += ["", f"**{'identical' if same else 'NOT identical'}** over {len(stages)} stages."]
    emit_report(lines, args.output or None)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
