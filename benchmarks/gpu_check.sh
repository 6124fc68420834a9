#!/usr/bin/env bash
# The device checks of one GPU lease, in one command (see benchmarks/RESULTS.md, "GPU" and the extraction
# section): `bash benchmarks/gpu_check.sh [tests] [timings] [extract]` (default: all three).
#   tests:   the CUDA/AMP tests (tests/engine/test_gpu.py)
#   timings: the reference-size R50-C4 timings (benchmarks/bench_gpu.py)
#   extract: region-embedding extraction throughput, ViT-B-32 and ovd-tiny (benchmarks/bench_extract.py)
# Needs the wheels in .whl/ that the device image (Python 3.12) lacks; from a machine with a package index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl open_clip_torch omegaconf ftfy wcwidth faster-coco-eval pycocotools
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # omegaconf's parser (an sdist only)
set -o pipefail
steps=${*:-tests timings extract}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OVD_DATASETS=/tmp/datasets
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import sys, torch, torchvision, open_clip, timm; print(sys.version.split()[0], torch.__version__, torchvision.__version__, open_clip.__version__, timm.__version__)" | tee -a "$out/machine.txt"
for step in $steps; do
  case $step in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -15 ;;
    timings) timeout 150 python3 benchmarks/bench_gpu.py --classes 80 1203 --repeats 10 --warmup 3 2>&1 | tee "$out/bench_gpu.md" ;;
    extract) timeout 330 python3 benchmarks/bench_extract.py --device cuda --threads 4 --workers 14 \
        --models ViT-B-32 ovd-tiny --backends batched batched:float32 --tiny-images 32000 --vit-images 32000 \
        --unique-images 500 --naive-budget 5 --forward-crops 4096 --store-images 200 \
        --output "$out/extract_gpu.md" 2>&1 | tee "$out/extract_gpu.log" | grep -v '^{' ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
