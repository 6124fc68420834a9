"""Teacher-aware RKD on OV-Shapes: the controlled study of issue #22, one command per table.

``sweep`` (choosing, dev world only): the RKD stage alone, from ONE base checkpoint (seed 0), for every
L1 weight × region-weighting mode × seed, each evaluated on ``ovshapes_dev`` with its region fidelity,
plus the box-only control ``base_continued`` per seed (the base-class cost is measured against it). All
stages are one generated pipeline file run by ``tools/run_pipeline.py`` (resumable: finished stages are
skipped; the regions are made once from the base stage). It writes the table, a JSON and a PNG plot, and
prints the setting picked by the selection rule (benchmarks/RESULTS.md, written before any run).

``val`` (touching val once): the whole OV-Shapes ablation pipeline (``configs/ovshapes/ablation.yaml``:
main job + control) over the seeds, today's recipe and the chosen setting side by side, then the adoption
rule of issue #22 with its numbers. One pipeline file per seed folder holds both: the ablation's stages and,
for every distilling stage, a ``<stage>_chosen`` twin with the setting (starting from the chosen twin where
the original starts from a distilling stage); the stages the setting does not touch (base, control, PIS)
are shared. ``--root`` may be the folder of a finished ``benchmarks/ovshapes_ablation.py`` run: its stages
are reused where their fingerprints match (``tools/run_pipeline.py``'s rule), so only the twins train.

    python benchmarks/ovshapes_rkd_study.py sweep --root output/rkd_study
    python benchmarks/ovshapes_rkd_study.py val --root output/ablation \
        --setting model.distill.region_weighting=max_prob model.distill.contradiction_iou=0.5

``--stage-overrides`` (both) go to every stage, e.g. a smoke test: ``solver.max_iter=20 solver.steps=[15]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import emit_report, header, row, table_header  # noqa: E402
from ovshapes_ablation import run_seeds  # noqa: E402

RECIPE_L1 = 0.15  # configs/ovshapes/rkd.yaml
WEIGHTS = [0.0375, 0.075, 0.15, 0.3, 0.6]  # 0.25× … 4× the recipe's λ_L1 (× weight_scale 100)
CONFIDENCE = ["model.distill.region_weighting=max_prob", "model.distill.weight_temperature=0.01"]
NO_FILTER = "model.distill.contradiction_iou=0.0"
MODES = {  # explicit, so that they mean the same whatever configs/ovshapes/rkd.yaml's defaults are
    "uniform": ["model.distill.region_weighting=uniform", NO_FILTER],  # the reference: every region weight 1
    "confidence": [*CONFIDENCE, NO_FILTER],  # w = the teacher's max posterior over the 16 training classes
    "confidence+filter": [*CONFIDENCE, "model.distill.contradiction_iou=0.5", "model.distill.contradiction_weight=0.0"],
}
DEV = "data.test=ovshapes_dev"
METRICS = ("AP50_novel", "AP50_base")
FIDELITY = tuple(f"fidelity_{m}_{s}" for m in ("cosine", "agreement", "student_acc") for s in ("base", "novel"))
BASE_COST_GOAL = 2.0  # AP50 (issue #4 / #22)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    m, s = _mean_sd(values)
    return f"{m:.1f} ± {s:.1f}" if abs(m) >= 1.5 else f"{m:.3f} ± {s:.3f}"  # cosines: 3 decimals


def _stage(mode: str, weight: float, seed: int) -> str:
    return f"rkd_{mode.replace('+', '_')}_l1_{weight:g}_s{seed}"


# --------------------------------------------------------------------------------------------------
# sweep (dev)
# --------------------------------------------------------------------------------------------------


def sweep_pipeline(weights: list[float], modes: list[str], seeds: list[int], parallel: int) -> dict:
    """The study's pipeline file: base (seed 0) → regions → controls and RKD stages, all on dev."""
    cfg = REPO / "configs" / "ovshapes"
    stages = [{"name": "base", "config": str(cfg / "base.yaml"), "overrides": ["num_threads=2", DEV]}]
    for seed in seeds:
        stages.append({"name": f"control_s{seed}", "config": str(cfg / "base_continued.yaml"),
                       "overrides": [f"seed={seed}", DEV]})  # fmt: skip
        for mode in modes:
            for w in weights:
                overrides = [f"seed={seed}", DEV, f"model.distill.l1_weight={w}", *MODES[mode]]
                stages.append({"name": _stage(mode, w, seed), "config": str(cfg / "rkd.yaml"), "overrides": overrides})
    return {"teacher": True, "parallel_stages": parallel, "stages": stages, "demo_images": 0,
            "regions": {"proposals": "base", "k": 16, "nms_thresh": 0.5}}  # fmt: skip


def _metrics(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "eval" / "metrics.json").read_text())


def sweep_table(root: Path, weights: list[float], modes: list[str], seeds: list[int]) -> dict:
    """Per setting: the per-seed metrics, the base cost against the same seed's control, and mean ± std."""
    control = {s: _metrics(root / f"control_s{s}") for s in seeds}
    rows = []
    for mode in modes:
        for w in weights:
            per_seed = [_metrics(root / _stage(mode, w, s)) for s in seeds]
            row = {"mode": mode, "l1_weight": w, "seeds": seeds}
            for k in (*METRICS, *FIDELITY):
                row[k] = [float(m[k]) for m in per_seed if m.get(k) is not None]
            base = [float(control[s]["AP50_base"]) for s in seeds]
            row["base_cost"] = [c - float(m["AP50_base"]) for c, m in zip(base, per_seed, strict=True)]
            rows.append(row)
    ctrl = {k: [float(control[s][k]) for s in seeds] for k in METRICS}
    return {"rows": rows, "control": ctrl}


def weight_stats(store: Path, num_regions: int = 5) -> list[str]:
    """Markdown rows: for each weights array in the store, the share of the regions RKD reads (the first
    ``num_regions`` of each image) that it drops (weight 0) and the mean weight of the others."""
    import numpy as np

    meta = json.loads((store / "meta.json").read_text())
    valid = np.load(store / "valid.npy")[:, :num_regions]  # (N, k)
    rows = []
    for name, how in sorted((meta.get("region_weights") or {}).items()):
        w = np.load(store / "region_weights" / f"{name}.npy")[:, :num_regions]  # (N, k)
        kept = w[valid & (w > 0)]
        dropped = float((valid & (w == 0)).sum()) / max(int(valid.sum()), 1)
        rows.append(row(how["mode"], f"{how['contradiction_iou']:g}", f"{100 * dropped:.1f} %",
                        f"{kept.mean() if kept.size else 0:.3f}"))  # fmt: skip
    return rows


def choose(result: dict) -> dict:
    """The dev selection rule (benchmarks/RESULTS.md): among settings with mean base cost ≤ 2 and mean
    novel AP50 ≥ (uniform at the recipe's weight: mean − std), the highest mean novel AP50; when none has
    base cost ≤ 2, the lowest mean base cost among those passing the novel condition."""
    rows = result["rows"]
    ref = next((r for r in rows if r["mode"] == "uniform" and r["l1_weight"] == RECIPE_L1), None)
    floor = -float("inf") if ref is None else _mean_sd(ref["AP50_novel"])[0] - _mean_sd(ref["AP50_novel"])[1]
    ok = [r for r in rows if statistics.mean(r["AP50_novel"]) >= floor]
    good = [r for r in ok if statistics.mean(r["base_cost"]) <= BASE_COST_GOAL]
    if good:
        pick, why = max(good, key=lambda r: statistics.mean(r["AP50_novel"])), "base cost ≤ 2, highest novel AP50"
    elif ok:
        pick, why = min(ok, key=lambda r: statistics.mean(r["base_cost"])), "none reached base cost ≤ 2: lowest cost"
    else:
        pick, why = ref or rows[0], "no setting kept novel AP50: the reference"
    return {"mode": pick["mode"], "l1_weight": pick["l1_weight"], "reason": why, "novel_floor": floor,
            "overrides": [f"model.distill.l1_weight={pick['l1_weight']}", *MODES[pick["mode"]]]}  # fmt: skip


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("AP50_novel", "novel AP50 (dev)"), ("base_cost", "base AP50 cost vs control (dev)"),
              ("fidelity_cosine_novel", "student–teacher cosine, novel GT regions"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["mode"] == mode and r[key]]
            xs = [r["l1_weight"] for r in rows]
            ms = [_mean_sd(r[key]) for r in rows]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=mode)
        if key == "base_cost":
            ax.axhline(BASE_COST_GOAL, color="grey", linestyle="--", linewidth=1, label="goal ≤ 2")
        ax.axvline(RECIPE_L1, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        weights = sorted({r["l1_weight"] for r in result["rows"]})
        ax.set_xticks(weights, [f"{w:g}" for w in weights])
        ax.minorticks_off()
        ax.set_xlabel("λ_L1 (× weight_scale 100)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_report(result: dict, pick: dict) -> list[str]:
    details = (f"Mean ± sample std over seeds {result['rows'][0]['seeds']} (RKD stage only, one base checkpoint; "
               f"`ovshapes_dev`, 300 images). Control (base_continued): novel {_fmt(result['control']['AP50_novel'])}, "
               f"base {_fmt(result['control']['AP50_base'])}.")  # fmt: skip
    lines = header("Teacher-aware RKD: the dev sweep (issue #22)", details, level=2)
    columns = ["mode", "λ_L1", "AP50 novel", "AP50 base", "base cost vs control", "cosine base / novel"]
    lines += table_header([*columns, "agreement base / novel", "student top-1 base / novel"], "lrrrrrrr")
    for r in result["rows"]:
        pairs = [f"{_fmt(r[f'{m}_base'])} / {_fmt(r[f'{m}_novel'])}" if r[f"{m}_base"] else "-"
                 for m in ("fidelity_cosine", "fidelity_agreement", "fidelity_student_acc")]  # fmt: skip
        lines.append(row(r["mode"], f"{r['l1_weight']:g}", _fmt(r["AP50_novel"]), _fmt(r["AP50_base"]),
                         _fmt(r["base_cost"]), *pairs))  # fmt: skip
    lines += ["", f"Selection rule → **{pick['mode']}, λ_L1 {pick['l1_weight']:g}** ({pick['reason']}; novel floor "
              f"{pick['novel_floor']:.1f}). Val command: `python benchmarks/ovshapes_rkd_study.py val --setting "
              f"{' '.join(pick['overrides'])}`."]  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------------
# val: today's recipe vs the chosen setting, whole pipeline
# --------------------------------------------------------------------------------------------------

STAGES = ("base_continued", "rkd", "rkd_pis_wt")


CHOSEN = "_chosen"  # suffix of the stages trained with the chosen setting


def val_pipeline(setting: list[str], parallel: int) -> dict:
    """``configs/ovshapes/ablation.yaml`` plus a ``<stage>_chosen`` twin of every distilling stage, trained with
    ``setting`` (a twin whose original starts from a distilling stage starts from that stage's twin)."""
    from ovd.config import load_config, load_pipeline

    pipe_file = REPO / "configs" / "ovshapes" / "ablation.yaml"
    raw = yaml.safe_load(pipe_file.read_text())
    stages = [dict(s, config=str(pipe_file.parent / s["config"])) for s in raw["stages"]]
    distilling = {
        s.name: load_config(pipe_file.parent / s.config, list(s.overrides)).model.distill.enabled
        for s in load_pipeline(pipe_file).stages
    }
    twins = []
    for s in stages:
        if not distilling[s["name"]]:
            continue
        init = load_config(s["config"], list(s.get("overrides", []))).init_stage
        extra = [f"init_stage={init}{CHOSEN}"] if distilling.get(init) else []
        twins.append(dict(s, name=s["name"] + CHOSEN, overrides=[*s.get("overrides", []), *setting, *extra]))
    return {**raw, "stages": [*stages, *twins], "parallel_stages": parallel, "demo_images": 0}


def val_numbers(root: Path, seeds: list[int]) -> tuple[dict, dict]:
    """(today, chosen): stage → metric → per-seed values, from each seed's ablation.json (and the RKD stage's
    fidelity); the chosen side has the twins under their original names and the shared stages."""
    today: dict[str, dict[str, list[float]]] = {}
    chosen: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        rows = json.loads((root / f"seed{seed}" / "ablation.json").read_text())["stages"]
        names = {r["stage"] for r in rows}
        for r in rows:
            name = r["stage"]
            sides = [chosen] if name.endswith(CHOSEN) else [today] + ([] if name + CHOSEN in names else [chosen])
            for side in sides:
                for k in METRICS:
                    side.setdefault(name.removesuffix(CHOSEN), {}).setdefault(k, []).append(float(r[k]))
        for side, stage in ((today, "rkd"), (chosen, "rkd" + CHOSEN)):
            fid = _metrics(root / f"seed{seed}" / stage)
            for k in FIDELITY:
                if fid.get(k) is not None:
                    side["rkd"].setdefault(k, []).append(float(fid[k]))
    return today, chosen


def adoption(today: dict, new: dict) -> dict:
    """Issue #22's rule, on val over the seeds: (1) the RKD stage's novel AP50 is not lower than today's by
    more than today's sample std; (2) its base cost against the control ≤ 2 AP50; (3) the full method's
    (rkd_pis_wt) novel AP50 does not drop (mean ≥ today's mean)."""
    t_rkd, t_sd = _mean_sd(today["rkd"]["AP50_novel"])
    n_rkd = statistics.mean(new["rkd"]["AP50_novel"])
    cost = statistics.mean(new["base_continued"]["AP50_base"]) - statistics.mean(new["rkd"]["AP50_base"])
    t_full, n_full = (statistics.mean(x["rkd_pis_wt"]["AP50_novel"]) for x in (today, new))
    checks = {
        "rkd_novel_within_1sd": (n_rkd >= t_rkd - t_sd, f"{n_rkd:.1f} vs {t_rkd:.1f} − {t_sd:.1f}"),
        "rkd_base_cost_le_2": (cost <= BASE_COST_GOAL, f"{cost:.1f}"),
        "full_novel_not_lower": (n_full >= t_full, f"{n_full:.1f} vs {t_full:.1f}"),
    }
    return {"adopt": all(ok for ok, _ in checks.values()), "checks": {k: {"pass": ok, "numbers": v}
                                                                        for k, (ok, v) in checks.items()}}  # fmt: skip


def plot_val(today: dict, new: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, METRICS, strict=True):
        for i, (name, data) in enumerate((("today", today), ("chosen", new))):
            stages = [s for s in data if key in data[s]]
            ms = [_mean_sd(data[s][key]) for s in stages]
            ax.bar([j + 0.4 * i for j in range(len(stages))], [m for m, _ in ms], 0.4, yerr=[s for _, s in ms],
                   capsize=3, label=name)  # fmt: skip
            ax.set_xticks([j + 0.2 for j in range(len(stages))], stages, rotation=30, ha="right")
        ax.set_title(f"{key.replace('_', ' ')} (val)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def val_report(today: dict, new: dict, rule: dict, setting: list[str]) -> list[str]:
    title = "Teacher-aware RKD on val: today's recipe vs the chosen setting (issue #22)"
    lines = header(title, f"Chosen setting: `{' '.join(setting)}`. Mean ± sample std over seeds.", level=2)
    lines += table_header(["stage", "novel, today", "novel, chosen", "base, today", "base, chosen"], "lrrrr")
    for stage in today:
        lines.append(row(stage, *(_fmt(x[stage][k]) if stage in x else "-" for k in METRICS for x in (today, new))))
    lines += ["", *table_header(["RKD fidelity (val GT regions)", "today", "chosen"], "lrr")]
    lines += [row(k, _fmt(today["rkd"][k]), _fmt(new["rkd"][k])) for k in FIDELITY if today["rkd"].get(k)]
    checks = "; ".join(f"{k} {'PASS' if v['pass'] else 'FAIL'} ({v['numbers']})" for k, v in rule["checks"].items())
    verdict = "adopt the chosen setting" if rule["adopt"] else "keep today's recipe (negative result)"
    lines += ["", f"Adoption rule: {checks} → **{verdict}**."]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="dev world: λ_L1 × mode × seed, RKD stage only")
    s.add_argument("--weights", type=float, nargs="+", default=WEIGHTS)
    s.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    s.add_argument("--parallel-stages", type=int, default=2)
    v = sub.add_parser("val", help="val: the whole pipeline, today's recipe vs --setting")
    v.add_argument("--setting", nargs="+", required=True, help="key=value overrides of the chosen setting")
    v.add_argument("--parallel", type=int, default=1, help="seeds run at once")
    v.add_argument("--parallel-stages", type=int, default=2, help="stages of one seed trained at once")
    for q in (s, v):
        q.add_argument("--root", type=Path, required=True)
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        q.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results", help="folder of the results")
        q.add_argument("--name", default="", help="file stem (default rkd_study_dev / rkd_study_val)")
        q.add_argument("--stage-overrides", nargs="*", default=[], help="key=value overrides for every stage")
        q.add_argument("--table-only", action="store_true", help="tabulate finished runs, train nothing")
    args = p.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    stem = args.output / (args.name or f"rkd_study_{'dev' if args.cmd == 'sweep' else 'val'}")
    if args.cmd == "sweep":
        pipe = args.root / "study_pipeline.yaml"
        pipe.write_text(yaml.safe_dump(sweep_pipeline(args.weights, args.modes, args.seeds, args.parallel_stages)))
        if not args.table_only:
            cmd = [sys.executable, str(REPO / "tools/run_pipeline.py"), "--config-file", str(pipe),
                   "--output-dir", str(args.root), *args.stage_overrides]  # fmt: skip
            subprocess.run(cmd, check=True, cwd=REPO)
        result = sweep_table(args.root, args.weights, args.modes, args.seeds)
        pick = choose(result)
        plot_sweep(result, stem.with_suffix(".png"))
        lines = sweep_report(result, pick) + ["", f"![dev sweep]({stem.with_suffix('.png').name})"]
        stats = weight_stats(args.root / "regions" / "ovshapes_train")
        lines += ["", "Region weights of the regions RKD reads (first 5 per training image):", "",
                  *table_header(["mode", "contradiction IoU", "dropped", "mean weight of the rest"], "lrrr"),
                  *stats]  # fmt: skip
        (stem.with_suffix(".json")).write_text(json.dumps({**result, "choice": pick}, indent=1))
    else:
        pipe = args.root / "val_pipeline.yaml"
        pipe.write_text(yaml.safe_dump(val_pipeline(args.setting, args.parallel_stages)))
        if not args.table_only:
            run_seeds(args.seeds, args.root, str(pipe), args.parallel, 1, args.stage_overrides)
        today, new = val_numbers(args.root, args.seeds)
        rule = adoption(today, new)
        plot_val(today, new, stem.with_suffix(".png"))
        lines = val_report(today, new, rule, args.setting) + ["", f"![val]({stem.with_suffix('.png').name})"]
        (stem.with_suffix(".json")).write_text(json.dumps({"today": today, "chosen": new, "adoption": rule}, indent=1))
    emit_report(lines, str(stem.with_suffix(".md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
