"""Run a multi-stage pipeline and print its ablation table (novel / base / all AP50 per stage).

    python tools/run_pipeline.py --config-file configs/ovshapes/pipeline.yaml --output-dir output/ovshapes

Finished stages are skipped and an interrupted stage resumes from its last checkpoint, so the same
command continues a killed run. ``--parallel-stages N`` trains up to N stages at once (each in its own
process) once the stages they start from are done; the numbers are those of a sequential run.

Before anything trains, a pre-flight check reads every input any stage will read (annotations, images,
captions, CLIP and backbone weights, text embeddings, output space) and lists all problems at once;
``--preflight-only`` runs just that. ``--smoke`` runs every stage of the recipe on the first 24 images
of each dataset, 2 iterations at 128 px (see datasets/README.md): the check of a new dataset before the
long run. A recipe entry of a list is overridden by index: ``data.sources[1].min_size=[320]``
(``[*]``: every entry).
"""

from __future__ import annotations

import argparse
import sys

from ovd.pipeline import format_ablation, run_pipeline
from ovd.smoke import SMOKE_IMAGES, tiny_model_overrides
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
    parser.add_argument("--preflight-only", action="store_true", help="only check the inputs and outputs, then stop")
    parser.add_argument("--smoke", action="store_true", help="every stage on a few images, 2 iterations, 128 px")
    parser.add_argument("--smoke-images", type=int, default=SMOKE_IMAGES, help="images per dataset of --smoke")
    parser.add_argument(
        "--smoke-tiny", action="store_true", help="with --smoke: a random-init tiny FPN detector and CLIP (no weights)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage's recipe")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = [*(tiny_model_overrides() if args.smoke and args.smoke_tiny else []), *args.overrides]
    smoke = args.smoke_images if args.smoke else 0
    result = run_pipeline(
        args.config_file,
        args.output_dir,
        overrides,
        parallel_stages=args.parallel_stages,
        smoke=smoke,
        preflight_only=args.preflight_only,
        rerun_changed=args.rerun_changed,
    )
    if args.preflight_only:
        report = result["preflight"]
        stores = ", ".join(f"{k} ~{v / 1e6:,.1f} MB" for k, v in report.store_bytes.items()) or "none to write"
        print(f"pre-flight check passed in {report.seconds:.1f} s: {report.images} images; region stores: {stores}")
        return 0
    print(format_ablation(result["stages"]))
    print(f"\nablation table: {args.output_dir}/ablation.json")
    for row in result["stages"]:
        print(f"{row['stage']}: {args.output_dir}/{row['stage']}/ (model_final.pth, eval/metrics.json, tensorboard/)")
    for path, entry in result["region_stores"].items():
        print(f"region store: {path} ({' + '.join(entry['datasets'])}; {entry['status']})")
    for kind in ("caption_tags", "pseudo_labels"):
        for path, status in result[kind].items():
            print(f"{kind.replace('_', ' ')}: {path} ({status})")
    if "demo" in result:
        print(f"demo: {result['demo']}/ (annotated images, detections.json)")
    prepared = ", ".join(f"{k} {v:.0f} s" for k, v in result["prepare_time_s"].items())
    print(f"wall time: {result['wall_time_s']:.0f} s (shared steps: {prepared}; stages: the table's last column)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
