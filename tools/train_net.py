"""Train (or evaluate) an open-vocabulary detector.

Single process:   python tools/train_net.py --config-file configs/ovshapes/base.yaml
Several GPUs:     torchrun --nproc_per_node 8 tools/train_net.py --config-file configs/coco/base.yaml
Resume:           python tools/train_net.py --config-file F --output-dir D --resume
Evaluate only:    python tools/train_net.py --config-file F --eval-only --weights D/model_final.pth
Check inputs:     python tools/train_net.py --config-file F --preflight-only

Before training, a pre-flight check reads every input the recipe will read and lists all problems at
once (``--no-preflight`` skips it). A list entry is overridden by index: ``data.sources[1].min_size=[320]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ovd.config import load_config
from ovd.engine.trainer import evaluate_checkpoint, train
from ovd.preflight import PreflightError, preflight
from ovd.utils.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="YAML recipe (may name a _base_)")
    parser.add_argument("--output-dir", default="output/run", help="where checkpoints, logs and metrics go")
    parser.add_argument("--resume", action="store_true", help="continue from the output dir's last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --weights on data.test")
    parser.add_argument("--weights", default="", help="checkpoint to evaluate with --eval-only")
    parser.add_argument("--preflight-only", action="store_true", help="only check the inputs and outputs, then stop")
    parser.add_argument("--no-preflight", action="store_true", help="skip the pre-flight check")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. solver.max_iter=100")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config_file, args.overrides)
    if not (args.no_preflight or args.eval_only):  # every rank: all stop together, none waits for the others
        report = preflight([cfg], [Path(args.output_dir)])
        if report.problems:
            raise PreflightError(report.problems)
        if args.preflight_only:
            print(f"pre-flight check passed in {report.seconds:.1f} s: {report.images} images")
            return 0
    if args.eval_only:
        metrics = evaluate_checkpoint(cfg, args.weights or cfg.init_weights, args.output_dir)
    else:
        metrics = train(cfg, args.output_dir, resume=args.resume)
    summary = {k: v for k, v in metrics.items() if k.startswith("AP")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
