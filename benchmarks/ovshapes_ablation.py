"""The OV-Shapes ablation over several seeds: runs a pipeline once per seed (default
``configs/ovshapes/ablation.yaml``: the main job's stages plus the box-only control ``base_continued``) and
tabulates novel / base / all AP50 per stage as mean ± std (issues #3, #4, #5).

Each seed is a separate ``tools/run_pipeline.py`` process (``seed=N`` applies to every stage: model
init, data order, augmentation); the dataset and the CLIP teacher are shared (the teacher stands for
web-pretrained CLIP, trained once). Runs resume: a finished seed's stages are skipped, but only when
their recorded fingerprints match the requested config (otherwise the pipeline stops, listing what
differs: use another --root, or pass --rerun-changed through to retrain the changed stages).

Example:
    python benchmarks/ovshapes_ablation.py --seeds 0 1 2 --parallel 3 --root output/ablation \
        --output benchmarks/results/ovshapes_ablation.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import VARIES, command, describe, emit_report, row, table_header  # noqa: E402
from timing import Stopwatch  # noqa: E402

KEYS = ("AP50_novel", "AP50_base", "AP50_all")


def run_seeds(
    seeds: list[int],
    root: Path,
    config: str,
    parallel: int,
    threads: int,
    overrides: list[str],
    stages: int | None = None,
    rerun_changed: bool = False,
) -> dict[int, float]:
    """Run the pipeline of every seed (``parallel`` at a time, each with ``stages`` stage processes at
    once; None: the pipeline file's ``parallel_stages``), ``overrides`` applied to every stage; returns
    each seed's wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, walls = list(seeds), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            out = root / f"seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(REPO / "tools/run_pipeline.py"), "--config-file", config,
                   "--output-dir", str(out), *([] if stages is None else ["--parallel-stages", str(stages)]),
                   *(["--rerun-changed"] if rerun_changed else []), f"seed={seed}", *overrides]  # fmt: skip
            log = open(out / "pipeline.log", "a")  # noqa: SIM115 (closed when the process ends; a rerun appends)
            running[seed] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log,
                             Stopwatch())  # fmt: skip
        for seed, (proc, log, clock) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); see {root}/seed{seed}/pipeline.log")
                walls[seed] = clock.elapsed()
                del running[seed]
        time.sleep(2)
    return walls


def table(root: Path, seeds: list[int]) -> tuple[str, list[str]]:
    """Markdown table of mean ± std per stage, and the per-seed rows."""
    per_stage: dict[str, dict[str, list[float]]] = {}
    order: list[str] = []
    for seed in seeds:
        result = json.loads((root / f"seed{seed}" / "ablation.json").read_text())
        for r in result["stages"]:
            if r["stage"] not in per_stage:
                order.append(r["stage"])
            stage = per_stage.setdefault(r["stage"], {k: [] for k in KEYS})
            for k in KEYS:
                stage[k].append(float(r[k]))
    lines = table_header(["stage", "AP50 novel", "AP50 base", "AP50 all"], "lrrr")
    for name in order:
        cells = []
        for k in KEYS:
            v = per_stage[name][k]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.1f} ± {sd:.1f}")
        lines.append(row(name, *cells))
    raw = [
        f"- {name}: " + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in per_stage[name][k]) for k in KEYS)
        for name in order
    ]
    return "\n".join(lines), raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--config", default="configs/ovshapes/ablation.yaml", help="pipeline file (default: the main job + control)"
    )
    p.add_argument("--root", type=Path, default=Path("output/ablation"))
    p.add_argument("--parallel", type=int, default=1, help="seeds run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel-stages", type=int, help="stages of one seed trained at once (default: the file's)")
    p.add_argument("--output", type=Path, help="markdown file to write")
    p.add_argument("--note", default="", help="a remark printed after the command (how the folders were made)")
    p.add_argument("--rerun-changed", action="store_true", help="retrain stages whose config or inputs changed")
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every stage of every seed")
    args = p.parse_args()
    with Stopwatch() as whole:
        walls = run_seeds(
            args.seeds, args.root, args.config, args.parallel, args.threads, args.overrides, args.parallel_stages,
            args.rerun_changed,
        )  # fmt: skip
        text, raw = table(args.root, args.seeds)
    from ovd.clip.teacher import teacher_path  # $OVD_DATASETS (default ./datasets), as the pipelines use

    teacher = json.loads(teacher_path().with_suffix(".json").read_text())["accuracy"]
    emit_report(
        [
            "## OV-Shapes ablation over seeds",
            "",
            f"Command: `{command()}`" + (f" ({args.note})" if args.note else ""),  # exactly as run
            "",
            f"- Machine: {describe(args.threads, gpu=True, load=True)}; {args.parallel} seed(s) at a time, "
            f"{args.threads} torch thread(s) each.",
            f"- {VARIES}",
            f"- Teacher (shared by all seeds): zero-shot top-1 {teacher['top1']} % (base {teacher['top1_base']} %, "
            f"novel {teacher['top1_novel']} %) on {teacher['num']} held-out crops.",
            "- Wall time per seed (s, runs overlapped): "
            + ", ".join(f"seed {s}: {w:.0f}" for s, w in sorted(walls.items()))
            + f"; whole benchmark {whole.s:.0f} s.",
            "",
            "Mean ± sample std over the seeds (OV-Shapes `default` val, 300 images, AP50 in %):",
            "",
            text,
            "",
            "Per seed:",
            "",
            *raw,
        ],
        args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
