"""Where the floors of the end-to-end tests come from (issue #18): the runs of
``tests/engine/test_method_floors_e2e.py`` and their controls, for several seeds and torch thread counts,
with an evaluation every tenth of the run, so a floor can be put where every working run stays above it near
the end and no control ever reaches it.

Runs on the easy PIS world of ``tests/easy_world.py`` (same overrides as the tests):

* ``box_only``: the control, base boxes only (it never sees a novel shape);
* ``pis``: base boxes + pseudo boxes (the test's PIS run);
* ``wt``: the weight-transfer stage trained on from that ``pis`` run's final weights;
* ``lvis_box_only`` / ``lvis_pis``: the same two on the LVIS path (Mask R-CNN, federated sigmoid
  classifier, federated metric with the novel classes rare).

Columns: base / novel AP50 (OV-COCO metric) or box APr / APc / APf and mask APr (LVIS metric, AP over IoU
0.5:0.95) at each evaluation.

    python benchmarks/e2e_floors.py --seeds 0 1 2 --threads 1 --root /tmp/floors \\
        --output benchmarks/results/e2e_floors.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import easy_world as world  # noqa: E402
from machine import emit_report, header, row, table_header  # noqa: E402

# each run as long as the test's (the box-only controls as long as the run they control)
ITERATIONS = {
    "box_only": world.PIS_ITERATIONS,
    "pis": world.PIS_ITERATIONS,
    "wt": world.WT_ITERATIONS,
    "lvis_box_only": world.LVIS_ITERATIONS,
    "lvis_pis": world.LVIS_ITERATIONS,
}


def _cell(metrics: dict, lvis: bool) -> str:
    if lvis:
        values = [metrics["bbox"][k] for k in ("APr", "APc", "APf")] + [metrics["segm"]["APr"]]
        return " / ".join("-" if v is None else f"{v:.1f}" for v in values)
    return f"{metrics['AP50_base']:.1f} / {metrics['AP50_novel']:.1f}"


def _run(kind: str, seed: int, threads: int, root: Path, out: Path) -> list[str]:
    """Train one run and return its cells: the evaluation every tenth of the run, the last one final."""
    from ovd.config import load_config
    from ovd.engine.trainer import train
    from ovd.utils.io import read_json

    lvis = kind.startswith("lvis")
    iters = ITERATIONS[kind]
    overrides = [*world.register_easy_pis_world(root, lvis=lvis), f"seed={seed}", f"num_threads={threads}"]
    overrides += [*world.schedule(iters), f"test.eval_period={iters // 10}"]
    if kind != "box_only" and kind != "lvis_box_only":
        overrides.append(world.pis_sources(lvis))
    if lvis:
        overrides += world.LVIS_OVERRIDES
    if kind == "wt":
        overrides += [*world.WT_OVERRIDES, f"init_weights={out.parent / f'pis_s{seed}_t{threads}' / 'model_final.pth'}"]
    recipe = "configs/ovshapes_lt/base.yaml" if lvis else "configs/ovshapes/base.yaml"
    final = train(load_config(REPO / recipe, overrides), out)
    steps = [read_json(d / "metrics.json") for d in sorted(out.glob("eval_0*"))]
    return [_cell(m, lvis) for m in [*steps, final]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--kinds", nargs="+", default=list(ITERATIONS), choices=list(ITERATIONS))
    p.add_argument("--root", type=Path, required=True, help="work folder (world and runs); reruns need a new one")
    p.add_argument("--output", default="", help="markdown file to write")
    args = p.parse_args()
    os.environ["OVD_DATASETS"] = str(args.root / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "wt" in args.kinds and "pis" not in args.kinds:
        missing = [s for s in args.seeds for t in args.threads if not (args.root / f"pis_s{s}_t{t}").is_dir()]
        if missing:
            p.error(f"wt trains on from the pis runs: list pis too (no pis run of seeds {missing} in --root)")

    lines = header(
        "End-to-end floors: the runs behind the test constants",
        "Runs of tests/engine/test_method_floors_e2e.py and their controls (each run sets the torch threads of its"
        " row); load: see Machine.",
        load=True,
    )
    for kind in args.kinds:
        lvis = kind.startswith("lvis")
        cols = [f"it {ITERATIONS[kind] * (i + 1) // 10}" for i in range(10)]
        lines += ["", f"### {kind} ({'box APr / APc / APf / mask APr' if lvis else 'AP50 base / novel'})", ""]
        lines += table_header(["seed", "threads", *cols], "ll" + "r" * len(cols))
        for seed in args.seeds:
            for threads in args.threads:
                cells = _run(kind, seed, threads, args.root / "datasets", args.root / f"{kind}_s{seed}_t{threads}")
                lines.append(row(str(seed), str(threads), *cells))
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
