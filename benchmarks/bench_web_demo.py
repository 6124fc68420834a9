"""Web demo latency: pressing Detect to the result in the page (measured in the browser) against calling
``Predictor`` directly in the same process, CPU.

    python benchmarks/bench_web_demo.py --repeats 20 --output benchmarks/results/web_demo.md

The OV-Shapes recipe (``configs/ovshapes/base.yaml``: its backbone, test scale 256 px, 50 detections)
trained for one iteration on ``ovshapes_small`` (or ``--checkpoint C``, e.g. the main job's
``output/ovshapes/rkd_pis_wt/model_final.pth``), served by ``ovd.app.page.launch`` on a free local port and
driven by headless Chromium (selenium, system chromium-driver). One OV-Shapes val image is uploaded once;
each page sample is the browser's ``performance.now()`` from the click on Detect to the moment the status
line of that request is shown with the annotated image loaded: the request through Gradio's queue,
decoding the uploaded file, the model, drawing, the table, the COCO JSON, PNG encoding and the
browser's rendering. Each direct sample is ``Predictor(path)`` (decoding included) with the same
checkpoint, vocabulary and threshold, in this process; the two are interleaved, so host load hits both
alike. The overhead is the difference of the medians (and the median of paired differences).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from machine import emit_report, header, load_average, row, table_header  # benchmarks/ (run from this folder's path)
from timing import Stopwatch

REPO = Path(__file__).resolve().parents[1]
# The 1-iteration OV-Shapes model: the recipe's architecture and test scale, no CLIP weights needed.
OVERRIDES = [
    "data.train=ovshapes_small_train",
    "data.test=",
    "data.num_workers=0",
    "clip.pretrained=",
    "solver.ims_per_batch=2",
    "solver.warmup_iters=1",
    "solver.max_iter=1",
]
_TIMED_RUN = """
const [request, done] = [arguments[0], arguments[arguments.length - 1]];
const status = document.querySelector('#status');
const start = performance.now();
document.querySelector('#run').click();
(function poll() {
  const img = document.querySelector('#annotated img');
  if (status.innerText.trim().startsWith(`Request ${request}:`) && img && img.complete && img.naturalWidth > 0) {
    done([performance.now() - start, status.innerText]);
  } else {
    setTimeout(poll, 1);
  }
})();
"""


def train_checkpoint(work: Path) -> Path:
    from ovd.config import load_config
    from ovd.engine.trainer import train

    train(load_config(REPO / "configs/ovshapes/base.yaml", OVERRIDES), work / "ovshapes_1iter")
    return work / "ovshapes_1iter/model_final.pth"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a trained checkpoint (default: the OV-Shapes recipe after 1 iteration)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs of each (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the OV-Shapes recipe uses 1)")
    p.add_argument("--confidence", type=float, default=0.3)
    p.add_argument("--output", help="write the markdown report here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from ovd.app import browser
    from ovd.app.models import ModelZoo, model_sources
    from ovd.app.page import launch
    from ovd.data.catalog import get_dataset
    from ovd.predictor import Predictor

    load_before = load_average()
    chromium, chromedriver, missing = browser.find_browser()
    if chromium is None or chromedriver is None:
        sys.exit(f"bench_web_demo: {missing}")
    with tempfile.TemporaryDirectory(prefix="bench_web_") as tmp:
        work = Path(tmp)
        os.environ.setdefault("OVD_DATASETS", str(work / "datasets"))
        os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")  # uploads and results deleted at the end
        checkpoint = Path(args.checkpoint) if args.checkpoint else train_checkpoint(work)
        image = sorted(get_dataset("ovshapes_small_val").image_root_path.glob("*.png"))[0]
        zoo = ModelZoo(model_sources([checkpoint]))
        direct = Predictor(checkpoint, confidence=args.confidence, device="cpu")
        port = browser.free_port()
        with browser.loopback_only():
            page = launch(zoo, port=port, workdir=work / "web", block=False)
            driver = browser.start_chromium(chromium, chromedriver)
            try:
                browser.open_page(driver, f"http://127.0.0.1:{port}/")
                browser.upload(driver, image)
                slider = browser.move_slider(driver, round(args.confidence * 100))
                assert abs(slider - args.confidence) < 1e-9, slider
                driver.set_script_timeout(120)
                page_ms, direct_ms, status = [], [], ""
                for i in range(args.warmup + args.repeats):
                    elapsed, status = driver.execute_async_script(_TIMED_RUN, i + 1)
                    with Stopwatch() as w:
                        prediction = direct(image)
                    if i >= args.warmup:
                        page_ms.append(elapsed)
                        direct_ms.append(w.s * 1e3)
            finally:
                driver.quit()
                page.close()
    assert f"{len(prediction)} detections" in status, status
    diffs = [a - b for a, b in zip(page_ms, direct_ms, strict=True)]
    page_med, direct_med = statistics.median(page_ms), statistics.median(direct_ms)
    model = checkpoint if args.checkpoint else "the OV-Shapes recipe after 1 iteration"
    details = (
        f"Model: {model}; image {image.name} ({len(prediction)} detections at confidence {args.confidence}); "
        f"medians of {args.repeats} runs after {args.warmup} warm-ups, page and direct interleaved; "
        f"{load_before} before, {load_average()} after (other jobs on the host)."
    )
    lines = header("", details, argv=argv, threads=args.threads)
    lines += table_header(["path", "median (ms)", "min (ms)", "max (ms)"], "lrrr")
    page_row = "page: click on Detect → status + annotated image shown (browser clock)"
    lines.append(row(page_row, f"{page_med:.1f}", f"{min(page_ms):.1f}", f"{max(page_ms):.1f}"))
    direct_row = "`Predictor(path)` in the same process"
    lines.append(row(direct_row, f"{direct_med:.1f}", f"{min(direct_ms):.1f}", f"{max(direct_ms):.1f}"))
    overhead = f"**{page_med - direct_med:.1f}**; {statistics.median(diffs):.1f}"
    lines.append(row("**page overhead** (difference of medians; median of paired differences)", overhead, "", ""))
    emit_report(lines, args.output or "")


if __name__ == "__main__":
    main()
