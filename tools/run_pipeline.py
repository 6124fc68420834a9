"""Run a multi-stage pipeline and print its ablation table (novel / base / all AP50 per stage).

    python tools/run_pipeline.py --config-file configs/ovshapes/pipeline.yaml --output-dir output/ovshapes

Finished stages are skipped and an interrupted stage resumes from its last checkpoint, so the same
command continues a killed run. ``--parallel-stages N`` trains up to N stages at once (each in its own
process) once the stages they start from are done; the numbers are those of a sequential run.
"""

from __future__ import annotations

import argparse
import sys

from ovd.pipeline import format_ablation, run_pipeline
from ovd.utils.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="pipeline YAML listing the stages")
    parser.add_argument("--output-dir", default="output/ovshapes", help="one sub-folder per stage goes here")
    parser.add_argument(
        "--parallel-stages", type=int, help="stages trained at once (default: the pipeline file's parallel_stages)"
    )
    parser.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again the stages whose settings or inputs changed since they were made, and every later stage",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage's recipe")
    args = parser.parse_args(argv)
    setup_logging()
    result = run_pipeline(
        args.config_file,
        args.output_dir,
        args.overrides,
        parallel_stages=args.parallel_stages,
        rerun_changed=args.rerun_changed,
    )
    print(format_ablation(result["stages"]))
    print(f"\nablation table: {args.output_dir}/ablation.json")
    for row in result["stages"]:
        print(f"{row['stage']}: {args.output_dir}/{row['stage']}/ (model_final.pth, eval/metrics.json, tensorboard/)")
    if "demo" in result:
        print(f"demo: {result['demo']}/ (annotated images, detections.json)")
    prepared = ", ".join(f"{k} {v:.0f} s" for k, v in result["prepare_time_s"].items())
    print(f"wall time: {result['wall_time_s']:.0f} s (shared steps: {prepared}; stages: the table's last column)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
