"""Inference latency of an exported ONNX model (onnxruntime) against the same model in PyTorch, CPU.

    python benchmarks/bench_onnx.py --configs configs/ovshapes/base.yaml --threads 1 2

For each config: the model with random weights and a random 80-class vocabulary (the classifier bias
and score threshold of the recipe; ``--score-thresh`` lowers the threshold so that NMS sees candidates),
exported by :func:`ovd.export.export_onnx`; then, side by side on the same random image at the recipe's
test scale, the median of ``--repeats`` single-image calls after ``--warmup`` calls: PyTorch
(``torch.no_grad``, the :class:`ovd.export.ExportableDetector` forward) and onnxruntime (CPU provider,
``intra_op_num_threads`` = torch threads). Detections are compared: how many of PyTorch's have an identical
twin (same label, score within 1e-4, IoU > 0.999) and a close one (score within 1e-3, IoU > 0.99) in
onnxruntime's. Random weights give near-tied scores that float rounding reorders, so the sets can differ
at the NMS and top-k cuts without any error in the graph (tests/test_export.py checks exact parity).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import Stopwatch, sample

from ovd.config import load_config
from ovd.export import ExportableDetector, export_onnx, matched_detections
from ovd.modeling.build import build_model
from ovd.predictor import Prediction


def _median_ms(fn, repeats: int, warmup: int) -> float:
    return statistics.median(sample(fn, repeats, warmup)) * 1e3


def _prediction(outputs) -> Prediction:
    boxes, scores, labels = (np.asarray(o) for o in outputs[:3])
    return Prediction(boxes.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64), [""] * len(labels))


def bench_config(path: str, args: argparse.Namespace, work: Path) -> list[dict]:
    overrides = [f"model.roi_heads.score_thresh_test={args.score_thresh}", "model.backbone.weights="]  # random init
    cfg = load_config(path, overrides)
    torch.manual_seed(0)
    model = build_model(cfg, class_embeddings=torch.randn(80, args.embed_dim)).eval()
    h = cfg.input.min_size_test
    w = min(int(round(h * 4 / 3)), cfg.input.max_size_test)  # a 4:3 image at the test scale
    onnx_path = work / (Path(path).stem + ".onnx")
    with Stopwatch() as export:
        export_onnx(model, onnx_path, class_names=[f"c{i}" for i in range(80)], min_size_test=h,
                    max_size_test=cfg.input.max_size_test, example_size=(h, w))  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (3, h, w), dtype=np.uint8)
    wrapper = ExportableDetector(model)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        tensor = torch.from_numpy(image)

        def run_torch(tensor: torch.Tensor = tensor) -> tuple:
            with torch.no_grad():
                return wrapper(tensor)

        def run_ort(session: ort.InferenceSession = session) -> list:
            return session.run(None, {"image": image})

        ref, got = _prediction([t.numpy() for t in run_torch()]), _prediction(run_ort())
        torch_ms = _median_ms(run_torch, args.repeats, args.warmup)
        ort_ms = _median_ms(run_ort, args.repeats, args.warmup)
        rows.append({
            "config": path, "size": f"{h}x{w}", "threads": threads, "torch_ms": torch_ms, "ort_ms": ort_ms,
            "detections": len(ref), "onnx_detections": len(got), "matched": matched_detections(ref, got),
            "matched_loose": matched_detections(ref, got, score_tol=1e-3, iou_min=0.99),
            "export_s": export.s, "onnx_mb": onnx_path.stat().st_size / 2**20,
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/ovshapes/base.yaml"], help="recipes to export")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (torch and onnxruntime)")
    p.add_argument("--embed-dim", type=int, default=64, help="text embedding width (64: ovd-tiny, 512: ViT-B-32)")
    p.add_argument("--score-thresh", type=float, default=0.05, help="test score threshold baked into the graph")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", help="write the markdown table here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        rows = [r for c in args.configs for r in bench_config(c, args, Path(tmp))]
    details = f"onnxruntime {ort.__version__}; medians of {args.repeats} calls after {args.warmup} warm-ups."
    lines = header("", details, argv=argv)
    columns = ["config", "image", "threads", "PyTorch (ms)", "onnxruntime (ms)", "PyTorch / onnxruntime"]
    columns += ["detections (PyTorch / ORT)", "identical", "within IoU 0.99, score 1e-3", "export (s)", "file (MB)"]
    lines += table_header(columns, "llrrrrrrrrr")
    for r in rows:
        ratio = f"**{r['torch_ms'] / r['ort_ms']:.2f}x**"
        lines.append(row(r["config"], r["size"], r["threads"], f"{r['torch_ms']:.1f}", f"{r['ort_ms']:.1f}", ratio,
                         f"{r['detections']} / {r['onnx_detections']}", r["matched"], r["matched_loose"],
                         f"{r['export_s']:.0f}", f"{r['onnx_mb']:.1f}"))  # fmt: skip
    emit_report(lines, args.output)


if __name__ == "__main__":
    main()
