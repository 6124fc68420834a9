"""Benchmark: the OV-Shapes RKD stage against a plain stage of the same length, side by side (issue #22).

Trains `configs/ovshapes/rkd.yaml` (region distillation + its region-fidelity evaluation) and the plain
stage `configs/ovshapes/base_continued.yaml` (the same recipe on boxes only) for ``--iters`` iterations
each, alternating round by round in one process (real data loader with the recipe's workers, the
recipe's evaluation on val), and reports per variant the median training-loop time, evaluation time
and whole-stage time, with the RKD / plain ratios. Both start from the same weights (``--init``, e.g.
a base stage's ``model_final.pth``; default random init) and, for RKD, read ``--store`` (a pipeline's
``regions/ovshapes_train``; default: a synthetic store of 16 random boxes and random unit embeddings per
training image, which costs the same as real regions: RKD reads the first 5 either way).

    python benchmarks/bench_rkd_stage.py --iters 60 --rounds 2 --output benchmarks/results/rkd_stage.md
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)

import ovd.engine.trainer as trainer
from ovd.config import load_config
from ovd.data.catalog import get_dataset
from ovd.data.coco import load_dataset
from ovd.distill.store import store_is_complete, write_region_store

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain (base_continued.yaml)": "configs/ovshapes/base_continued.yaml",
    "RKD (rkd.yaml)": "configs/ovshapes/rkd.yaml",
}


def synthetic_store(path: Path, k: int = 16, dim: int = 64, seed: int = 0) -> Path:
    """``k`` random boxes (10–30 % of each side) with random unit embeddings per training image."""
    if store_is_complete(path):
        return path
    records = load_dataset(get_dataset("ovshapes_train"))
    rng = np.random.default_rng(seed)
    boxes = np.zeros((len(records), k, 4), np.float32)
    for i, r in enumerate(records):
        size = np.array([r.width, r.height], np.float32)
        xy = rng.uniform(0, 0.7, (k, 2)) * size
        boxes[i] = np.concatenate([xy, np.minimum(xy + rng.uniform(0.1, 0.3, (k, 2)) * size, size)], axis=1)
    emb = rng.normal(size=(len(records), k, dim))
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    ids = np.array([r.image_id for r in records], np.int64)
    meta = {"dataset": "ovshapes_train", "proposals": {"kind": "synthetic"}, "clip": {"model": "random"}}
    return write_region_store(path, image_ids=ids, boxes=boxes, embeddings=emb, valid=np.ones((len(records), k), bool),
                              metadata=meta)  # fmt: skip


def _clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children: the loader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime


def run_stage(config: str, overrides: list[str], out: Path) -> tuple[float, float, float, float]:
    """(training wall, evaluation wall, training CPU, evaluation CPU) seconds of one stage run in ``out``.

    CPU time counts the DataLoader workers too (they have exited when ``train`` / ``evaluate`` return); on
    a shared host it moves much less than wall time with the other jobs' load."""
    spent = [0.0, 0.0]
    evaluate = trainer.evaluate

    def timed(*args, **kwargs):
        start = _clocks()
        try:
            return evaluate(*args, **kwargs)
        finally:
            spent[:] = [a - b for a, b in zip(_clocks(), start, strict=True)]

    trainer.evaluate = timed  # the trainer's final evaluation, timed apart from its training loop
    try:
        start = _clocks()
        trainer.train(load_config(REPO / config, overrides), out)
        wall, cpu = (a - b for a, b in zip(_clocks(), start, strict=True))
    finally:
        trainer.evaluate = evaluate
    return wall - spent[0], spent[0], cpu - spent[1], spent[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=60, help="iterations per stage run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (medians are reported)")
    parser.add_argument("--store", default="", help="RKD region store of ovshapes_train (default: synthetic)")
    parser.add_argument("--init", default="", help="weights both stages start from (default: random init)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the recipes: 1)")
    parser.add_argument("--output", default="", help="also write the markdown report here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both variants")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_rkd_stage_"))
    store = args.store or str(synthetic_store(work / "store"))
    common = [f"solver.max_iter={args.iters}", f"solver.checkpoint_period={10 * args.iters}", "init_stage=",
              f"init_weights={args.init}", f"num_threads={args.threads}", f"data.region_store={store}",
              *args.overrides]  # fmt: skip
    times: dict[str, list[tuple[float, ...]]] = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for name, config in VARIANTS.items():
            t = run_stage(config, common, work / f"{r}_{Path(config).stem}")
            times[name].append((*t, t[0] + t[1], t[2] + t[3]))  # + whole-stage wall and CPU
            print(f"round {r} {name}: " + ", ".join(f"{x:.1f}" for x in times[name][-1]), flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in range(6)] for k, v in times.items()}
    plain, rkd = med.values()
    cols = ("training loop", "evaluation", "whole stage")
    details = (
        f"- The recipes' loader workers; {args.iters} iterations per stage run, {args.rounds} alternating rounds, "
        "medians; store: "
        f"{'synthetic (16 random regions per image)' if not args.store else args.store}; init: "
        f"{args.init or 'random'}. Evaluation = the recipe's final evaluation on val (RKD: with region fidelity)."
    )
    title = "The RKD stage against a plain stage of the same length (issue #22)"
    lines = header(title, details, threads=args.threads, load=True, level=2)
    lines += table_header(["variant", *(f"{c}, wall (s)" for c in cols), *(f"{c}, CPU (s)" for c in cols)], "lrrrrrr")
    order = (0, 1, 4, 2, 3, 5)
    lines += [row(k, *(f"{v[i]:.1f}" for i in order)) for k, v in med.items()]
    lines += [
        row("**RKD / plain**", *(f"**{rkd[i] / plain[i]:.3f}×**" for i in order)),
        "",
        "Per round (training wall, evaluation wall, training CPU, evaluation CPU; s): "
        + "; ".join(f"{k}: " + ", ".join("/".join(f"{x:.1f}" for x in t[:4]) for t in v) for k, v in times.items()),
    ]
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
