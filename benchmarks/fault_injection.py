"""Fault injection: SIGKILL training, region extraction, pseudo-labelling and the whole pipeline at random
points, rerun the same command each time, and check that the final result is identical to an uninterrupted
run's (issue #18, deliverable 3).

For each target: one uninterrupted reference run; then chains in fresh folders: start the command, SIGKILL
its process group after a random delay (uniform over the shortest whole run seen: the reference's, or a
chain's first run that finished before its kill), start it again, ... until
the target's kill count is reached, then let the last run finish. Compared with the reference: the final
model weights (every tensor), the region store's arrays and meta.json, the pseudo-label JSON, each
stage's eval/metrics.json (timing and creation-date fields left out). A rerun that exits non-zero (e.g.
reading a cut file) fails the chain. Also counted: kills that hit a run after it had written something
(a checkpoint, a store part), and temporary files left by killed writes (never read: atomic renames).

Tiny configs: OV-Shapes `small` (48 train / 24 val images), 64-128 px, a random-init tiny CLIP saved once
to a file (so every process uses the same weights). One torch thread per process.

Example:
    python benchmarks/fault_injection.py --kills 20 --work /tmp/ovd_fault --output benchmarks/results/fault_injection.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import emit_report, header, row, table_header  # noqa: E402
from timing import Stopwatch  # noqa: E402

TRAIN = [
    "data.train=ovshapes_small_train", "data.test=ovshapes_small_val", "data.num_workers=0", "clip.pretrained=",
    "solver.ims_per_batch=2", "solver.max_iter=8", "solver.warmup_iters=2", "solver.steps=[6]",
    "solver.checkpoint_period=2", "log_period=1", "input.min_size_train=[96]", "input.min_size_train_sampling=choice",
    "input.min_size_test=96", "model.rpn.post_nms_top_n_test=30", "num_threads=1",
]  # fmt: skip
_VOLATILE = ("time", "created", "date", "wall")  # JSON keys that differ between identical runs


def _json(path: Path) -> Any:
    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if not any(w in k for w in _VOLATILE)}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    return clean(json.loads(path.read_text()))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights(path: Path) -> str:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _store(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("boxes.npy", "embeddings.npy", "valid.npy", "image_ids.npy"):
        h.update((path / name).read_bytes())
    meta = _json(path / "meta.json")
    meta.get("proposals", {}).pop("path", None)  # the proposer's own folder: differs by design (its sha256 is kept)
    h.update(_digest(meta).encode())
    return h.hexdigest()[:16]


def _setup(work: Path) -> dict[str, Path]:
    """A tiny CLIP file, a proposer checkpoint and the region store the pseudo-labelling reads."""
    files = {"clip": work / "tiny_clip.pt", "proposer": work / "proposer" / "model_final.pth",
             "store": work / "proposer_store", "pipeline": work / "pipeline.yaml"}  # fmt: skip
    if not files["clip"].is_file():
        import torch

        from ovd.clip import create_clip, save_clip_checkpoint

        torch.manual_seed(0)
        save_clip_checkpoint(create_clip("ovd-tiny-cnn", None), files["clip"])
    if not files["proposer"].is_file():
        _run(_commands(files, work)["train"](work / "proposer"))
    if not (files["store"] / "meta.json").is_file():
        _run(_commands(files, work)["extract"](files["store"]))
    import yaml

    fast = [o for o in TRAIN if not o.startswith(("solver.max_iter", "solver.steps"))]
    spec = {
        "stages": [
            {"name": "base", "config": str(REPO / "configs/ovshapes/base.yaml"),
             "overrides": [*fast, "solver.max_iter=4", "solver.steps=[3]"]},
            {"name": "rkd", "config": str(REPO / "configs/ovshapes/rkd.yaml"),
             "overrides": [*fast, "solver.max_iter=4", "solver.steps=[3]"]},
        ],
        "regions": {"proposals": "base", "k": 3, "batch_size": 64},
        "demo_images": 0,
    }  # fmt: skip
    files["pipeline"].write_text(yaml.safe_dump(spec))
    return files


def _commands(files: dict[str, Path], work: Path) -> dict[str, Any]:
    py = [sys.executable]
    return {
        "train": lambda out: [*py, "tools/train_net.py", "--config-file", "configs/ovshapes/base.yaml",
                              "--output-dir", str(out), "--resume", *TRAIN],
        "extract": lambda out: [*py, "tools/extract_region_embeddings.py", "--dataset", "ovshapes_small_train",
                                "--proposals", str(files["proposer"]), "--clip-model", "ovd-tiny-cnn",
                                "--clip-pretrained", str(files["clip"]), "--k", "3", "--chunk-size", "6",
                                "--workers", "0", "--batch-size", "64", "--device", "cpu", "--output", str(out),
                                "--no-progress"],
        "pseudo": lambda out: [*py, "tools/generate_pseudo_labels.py", "--dataset", "ovshapes_small_captions",
                               "--source", "clip", "--region-store", str(files["store"]), "--clip-model",
                               "ovd-tiny-cnn", "--clip-pretrained", str(files["clip"]), "--threshold", "0.0",
                               "--no-progress", "--output", str(out / "pseudo.json")],
        "pipeline": lambda out: [*py, "tools/run_pipeline.py", "--config-file", str(files["pipeline"]),
                                 "--output-dir", str(out)],
    }  # fmt: skip


def _result(target: str, out: Path) -> dict[str, str]:
    """What must be identical to the reference."""
    if target == "train":
        return {"weights": _weights(out / "model_final.pth"), "metrics": _digest(_json(out / "eval/metrics.json"))}
    if target == "extract":
        return {"store": _store(out)}
    if target == "pseudo":
        return {"pseudo_labels": _digest(_json(out / "pseudo.json"))}
    return {
        **{f"{s}.weights": _weights(out / s / "model_final.pth") for s in ("base", "rkd")},
        **{f"{s}.metrics": _digest(_json(out / s / "eval/metrics.json")) for s in ("base", "rkd")},
        "store": _store(out / "regions" / "ovshapes_small_train"),
    }


def _written(out: Path) -> bool:
    """Whether a killed run had already left finished work to resume from."""
    return any(out.rglob("model_*.pth")) or any(out.rglob("*.npz")) or any(out.rglob("meta.json"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip


def _run(cmd: list[str], log: Path | None = None) -> float:
    with Stopwatch() as w, open(log or os.devnull, "a") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {rc}); see {log}")
    return w.s


def _killed_run(cmd: list[str], delay: float, log: Path) -> float | None:
    """Start ``cmd``, SIGKILL its process group after ``delay`` s; None if killed, else its wall time."""
    with Stopwatch() as w, open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}) after a kill; see {log}")
    return w.s


def inject(target: str, make_cmd: Any, work: Path, kills: int, rng: random.Random) -> dict[str, Any]:
    ref_dir = work / target / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    wall = _run(make_cmd(ref_dir), work / f"{target}.log")
    reference = _result(target, ref_dir)
    stats = {"target": target, "reference_s": round(wall, 1), "kills": 0, "kills_after_output": 0, "runs": 0,
             "chains": 0, "identical": 0, "leftover_tmp": 0}  # fmt: skip
    while stats["kills"] < kills:
        out = work / target / f"chain{stats['chains']}"
        shutil.rmtree(out, ignore_errors=True)
        if target == "pseudo":
            out.mkdir(parents=True)
        stats["chains"] += 1
        for i in range(5):  # up to 5 kills per chain, then the run that finishes
            stats["runs"] += 1
            finished = _killed_run(make_cmd(out), rng.uniform(0.5, wall), work / f"{target}.log")
            if finished is not None:
                if i == 0:  # a whole run from scratch: the machine's current speed (load varies)
                    wall = min(wall, finished)
                break
            stats["kills"] += 1
            stats["kills_after_output"] += _written(out)
        else:
            stats["runs"] += 1
            _run(make_cmd(out), work / f"{target}.log")
        stats["leftover_tmp"] += sum(1 for p in out.rglob(".*") if p.is_file() and p.name != ".ovd.lock")
        try:
            stats["identical"] += _result(target, out) == reference
        except (OSError, KeyError, ValueError) as e:  # a run that exited 0 without its result
            print(f"{target} chain {stats['chains']}: no result ({e})", flush=True)
        print(json.dumps(stats), flush=True)
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs per target (at least)")
    p.add_argument("--targets", nargs="+", default=["train", "extract", "pseudo", "pipeline"])
    p.add_argument("--work", type=Path, default=Path("/tmp/ovd_fault"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="markdown file to write")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OVD_DATASETS", str(args.work / "datasets"))
    files = _setup(args.work)
    commands = _commands(files, args.work)
    rng = random.Random(args.seed)
    rows = [inject(t, commands[t], args.work, args.kills, rng) for t in args.targets]
    lines = header("", "One torch thread per process.", threads=1)
    columns = ["target", "reference run (s)", "SIGKILLs", "of them after output was written", "runs", "chains"]
    lines += table_header([*columns, "final results identical", "temporary files left"], "lrrrrrrr")
    for r in rows:
        lines.append(row(r["target"], r["reference_s"], r["kills"], r["kills_after_output"], r["runs"], r["chains"],
                         f"{r['identical']} / {r['chains']}", r["leftover_tmp"]))  # fmt: skip
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
