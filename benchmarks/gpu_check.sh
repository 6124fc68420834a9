#!/usr/bin/env bash
# The device checks of one GPU lease, in one command (see benchmarks/RESULTS.md, "GPU"):
# the CUDA/AMP tests, then the reference-size timings. Needs the wheels in .whl/ that the
# device image lacks (open_clip, omegaconf, faster-coco-eval, pycocotools, ftfy, wcwidth, timm).
set -o pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OVD_DATASETS=/tmp/datasets
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import sys, torch, torchvision, open_clip, timm; print(sys.version.split()[0], torch.__version__, torchvision.__version__, open_clip.__version__, timm.__version__)" | tee -a "$out/machine.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
timeout 150 python3 benchmarks/bench_gpu.py --classes 80 1203 --repeats 10 --warmup 3 2>&1 | tee "$out/bench_gpu.md"
