"""Region-embedding extraction throughput, store size and store read latency (RKD, METHOD §3.2).

    python benchmarks/bench_extract.py --threads 2 --output benchmarks/results/extract.md

For each CLIP model (random init; the speed does not depend on the weights) on the same synthetic
COCO-like images (640x480 JPEG) and the same boxes (5 random proposals per image, after NMS):

* **ovd**: :func:`ovd.distill.extract_region_embeddings` end to end (decode + crop in DataLoader
  workers, batched CLIP forward, part files, merge into the store);
* **(a) naive**: the reference's loop (METHOD §3.2): ``PIL.open`` per image, then per box
  ``crop → preprocess → encode_image`` with batch 1 (without its pickle writing);
* **(b) forward only**: ``encode_images`` on crops already preprocessed in memory, in batches of
  ``--batch-size``: the upper bound for any pipeline running the same model on this machine.

Then a synthetic store of ``--store-images`` images (K=5, D=512, fp16) against the reference's one
pickle per image: bytes per image and the latency of reading the regions of one training batch
(8 random images).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from machine import emit_report, header, row, table_header  # benchmarks/ (scripts run from this folder's path)
from timing import Stopwatch, sample

from ovd.clip import create_clip
from ovd.distill import ExtractionCfg, FileProposals, RegionStore, extract_region_embeddings, write_region_store
from ovd.structures import ImageRecord


def make_images(
    root: Path, n: int, width: int, height: int, seed: int, unique: int = 1000
) -> tuple[list[ImageRecord], Path]:
    """``n`` JPEGs with smooth content plus noise (the first ``unique`` generated, the rest copies of
    them: decoding costs the same), and 5 random boxes per image as a COCO results file."""
    rng = np.random.default_rng(seed)
    records, results = [], []
    for i in range(n):
        path = root / f"{i:06d}.jpg"
        if i >= unique:
            shutil.copyfile(root / f"{i % unique:06d}.jpg", path)
        else:
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
            img = np.clip(img + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        records.append(ImageRecord(image_id=i + 1, file_name=str(path), height=height, width=width))
        for _ in range(5):
            w, h = rng.uniform(0.05, 0.9) * width, rng.uniform(0.05, 0.9) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            results.append({"image_id": i + 1, "bbox": [x, y, w, h], "score": float(rng.random())})
    props = root / "props.json"
    props.write_text(json.dumps(results))
    return records, props


@torch.no_grad()
def naive_loop(clip, records, store: RegionStore, budget_s: float) -> tuple[int, float, list[np.ndarray]]:
    """Reference-style extraction; stops after the image during which ``budget_s`` ran out."""
    from PIL import Image

    warm = Image.open(records[0].file_name).convert("RGB").crop((0, 0, 32, 32))
    clip.model.encode_image(clip.preprocess(warm).unsqueeze(0).to(clip.device)).cpu()  # warm-up
    clock, n, embs = Stopwatch(), 0, []
    for rec in records:
        boxes, _ = store.lookup(rec.image_id)
        image = Image.open(rec.file_name).convert("RGB")
        for box in boxes:
            crop = image.crop(tuple(box.tolist()))
            x = clip.preprocess(crop).unsqueeze(0).to(clip.device)
            embs.append(clip.model.encode_image(x).float().cpu().numpy()[0])
            n += 1
        if clock.elapsed() > budget_s:
            break
    return n, clock.elapsed(), embs


@torch.no_grad()
def forward_only(clip, crops: torch.Tensor, batch_size: int) -> float:
    crops = crops.to(clip.device)
    clip.encode_images(crops[:batch_size])  # warm-up

    def run() -> None:
        for i in range(0, len(crops), batch_size):
            clip.encode_images(crops[i : i + batch_size])

    return sample(run, 1, sync=lambda: _sync(clip.device))[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def crop_kernels_only(clip, records, store: RegionStore, args, dtype: torch.dtype) -> float:
    """Seconds that the batched backend's crop kernels alone take for all regions of ``records``, on
    image batches already on the device (tasks of ``batch_size / 10`` images, as the extraction)."""
    from ovd.distill.crops import CropPreprocess, batched_crop_resize, crop_rects, pad_stack

    prep = CropPreprocess.from_clip(clip)
    per_task = max(1, args.batch_size // 10)
    tasks = []
    for i in range(0, min(len(records), 50 * per_task), per_task):
        recs = records[i : i + per_task]
        images = [cv2.imread(r.file_name) for r in recs]
        batch = torch.from_numpy(pad_stack(images)).to(clip.device)
        tasks.append((batch, [crop_rects(store.lookup(r.image_id)[0], r.height, r.width) for r in recs]))
    batched_crop_resize(tasks[0][0], tasks[0][1], prep, bgr=True, dtype=dtype)  # warm-up

    def run() -> None:
        for batch, rects in tasks:
            batched_crop_resize(batch, rects, prep, bgr=True, dtype=dtype)

    seconds = sample(run, 1, sync=lambda: _sync(clip.device))[0]
    regions = sum(len(r) for _, rects in tasks for r in rects)
    return seconds * store.metadata["num_regions"] / regions


def preprocessed_crops(clip, records, store: RegionStore, limit: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for rec in records:
        boxes, _ = store.lookup(rec.image_id)
        image = Image.open(rec.file_name).convert("RGB")
        out += [clip.preprocess(image.crop(tuple(b.tolist()))) for b in boxes]
        if len(out) >= limit:
            break
    return torch.stack(out[:limit])


def bench_model(name, records, props, work: Path, args) -> list[dict]:
    torch.manual_seed(0)
    clip = create_clip(name, None, device=args.device)
    source = FileProposals(props)
    ours = {}
    for backend in args.backends:
        resize, *opts = backend.split(":")  # e.g. batched:queue, batched:float32
        out = work / f"store_{name}_{backend.replace(':', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        with Stopwatch() as w:
            options = ExtractionCfg(
                batch_size=args.batch_size, num_workers=args.workers, chunk_size=args.chunk_size,
                resize_backend=resize, host_ring="queue" not in opts,
                crop_dtype=next((o for o in opts if o.startswith("float")), "auto"),
            )  # fmt: skip
            extract_region_embeddings(records, source, clip, out, options, progress=False)
        ours[backend] = (w.s, RegionStore.open(out))
    store = ours[args.backends[0]][1]
    regions = store.metadata["num_regions"]
    n_naive, naive_s, naive_embs = naive_loop(clip, records, store, args.naive_budget)
    ref = np.stack(naive_embs)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    crops = preprocessed_crops(clip, records, store, min(regions, args.forward_crops))
    fwd_s = forward_only(clip, crops, args.batch_size)
    rows = []
    for backend, (seconds, st) in ours.items():
        stored = np.concatenate([st.lookup(r.image_id)[1] for r in records])[:n_naive]
        crop = st.metadata["crop_preprocess"]
        dtype = crop.get("matmul_dtype")
        crop_s = None
        if dtype and args.device.startswith("cuda"):
            crop_s = crop_kernels_only(clip, records, store, args, getattr(torch, dtype))
        label = crop["backend"] + (f" {dtype}" if dtype else "") + (" (queue)" if ":queue" in backend else "")
        rows.append(
            {
                "model": name,
                "backend": label,
                "crop_kernels": None if crop_s is None else regions / crop_s,
                "images": len(records),
                "regions": regions,
                "ours": regions / seconds,
                "naive": n_naive / naive_s,
                "naive_regions": n_naive,
                "forward": len(crops) / fwd_s,
                "forward_regions": len(crops),
                "min_cos": float(np.sum(stored * ref, axis=1).min()),
            }
        )
    return rows


def bench_store(work: Path, n: int, k: int = 5, d: int = 512, batch: int = 8, lookups: int = 2000) -> dict:
    rng = np.random.default_rng(0)
    ids = np.arange(1, n + 1, dtype=np.int64) * 7
    xy = rng.uniform(0, 400, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (n, k, 2))], axis=2).astype(np.float32)
    emb = rng.normal(size=(n, k, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    valid = np.ones((n, k), dtype=bool)
    path = write_region_store(work / "store_synth", image_ids=ids, boxes=boxes, embeddings=emb, valid=valid,
                              metadata={"dataset": "synthetic"})  # fmt: skip
    size = sum(f.stat().st_size for f in path.iterdir())
    with Stopwatch() as w:
        store = RegionStore.open(path)
    open_ms = w.s * 1e3

    def read_batch() -> None:
        for i in rng.choice(ids, batch, replace=False):
            store.lookup(int(i))

    times = sample(read_batch, lookups)
    # the reference: one pickle per image, a score-sorted list of (int box list, FloatTensor[1, 512])
    pk = work / "pickles"
    pk.mkdir(exist_ok=True)
    n_pk = min(n, 1000)
    for m in range(n_pk):
        entry = [(boxes[m, j].astype(int).tolist(), torch.from_numpy(emb[m, j][None].copy())) for j in range(k)]
        with open(pk / f"{ids[m]:012d}.pkl", "wb") as f:
            pickle.dump(entry, f)
    files = sorted(pk.iterdir())
    pk_bytes = statistics.mean(f.stat().st_size for f in files)
    pk_disk = statistics.mean(f.stat().st_blocks * 512 for f in files)

    def read_pickles() -> None:
        for i in rng.choice(len(files), batch, replace=False):
            with open(files[i], "rb") as f:
                pickle.load(f)

    pk_times = sample(read_pickles, lookups // 4)
    return {
        "n": n, "k": k, "d": d, "batch": batch, "bytes_per_image": size / n, "open_ms": open_ms,
        "read_ms": statistics.median(times) * 1e3, "read_p99_ms": float(np.percentile(times, 99)) * 1e3,
        "pickle_bytes": pk_bytes, "pickle_disk": pk_disk, "pickle_read_ms": statistics.median(pk_times) * 1e3,
        "pickle_p99_ms": float(np.percentile(pk_times, 99)) * 1e3,
    }  # fmt: skip


def report(args, rows, store, gen_s, total_s) -> list[str]:
    details = [
        f"- CLIP on {args.device} (load average at the end of the run: the machine is shared).",
        f"- Data: synthetic 640x480 JPEGs (generated in {gen_s:.1f} s), 5 random boxes per image, NMS 0.5, K=5; "
        f"CLIP batch {args.batch_size}, {args.workers} DataLoader workers, chunk {args.chunk_size}.",
        "- ovd = `extract_region_embeddings` end to end (decode, crop, encode, part files, merge); resize "
        "`pil`: crops resized by PIL in the workers, `tensor`: workers decode, crops resized one by one by torch "
        "on the CLIP device, `batched`: workers decode into one zero-padded batch, every crop made by two "
        "batched matrix products on the CLIP device. "
        "(a) = reference loop: PIL open, per box crop + `preprocess` + batch-1 `encode_image`. "
        "(b) = `encode_images` alone on crops already preprocessed in memory (upper bound). "
        "(c) (GPU) = the batched backend's crop kernels alone on image batches already on the device; "
        "(b+c) = the device-side bound of the batched backend, 1 / (1/b + 1/c). "
        "`batched float16/float32`: the dtype of its matrix products; "
        "`(queue)`: images through the DataLoader's queue instead of the shared decode buffers.",
    ]
    title = "RKD region-embedding extraction: throughput, store size, read latency"
    lines = header(title, "\n".join(details), argv=args.argv, threads=args.threads, gpu=True, load=True, level=2)
    columns = ["CLIP", "ovd resize", "images", "regions", "ovd (regions/s)", "(a) naive (regions/s)"]
    columns += ["(b) forward only (regions/s)", "(c) crop kernels", "ovd / (a)", "ovd / (b)", "ovd / (b+c)"]
    lines += table_header([*columns, "min cos(ovd, a)"], "llrrrrrrrrrr")
    for r in rows:
        c = r["crop_kernels"]
        both = f"{100 * r['ours'] * (1 / r['forward'] + 1 / c):.0f} %" if c else "-"
        lines.append(row(r["model"], r["backend"], r["images"], r["regions"], f"{r['ours']:.1f}",
                         f"{r['naive']:.1f} (on {r['naive_regions']})",
                         f"{r['forward']:.1f} (on {r['forward_regions']})",
                         f"{c:.0f}" if c else "-", f"**{r['ours'] / r['naive']:.1f}x**",
                         f"**{100 * r['ours'] / r['forward']:.0f} %**", both, f"{r['min_cos']:.4f}"))  # fmt: skip
    s = store
    lines += [
        "",
        f"Store: {s['n']} images, K={s['k']}, D={s['d']}; one training batch = {s['batch']} random images "
        f"(`lookup` each), median over 2000 batches (pickles: 500 batches from 1000 files; page cache warm for both).",
        "",
        *table_header(
            ["format", "bytes / image", "on disk / image", "read one batch, median (ms)", "p99 (ms)"], "lrrrr"
        ),
        row(
            "ovd store (.npy, fp16, mmap)",
            f"{s['bytes_per_image']:.0f}",
            f"{s['bytes_per_image']:.0f}",
            f"{s['read_ms']:.3f}",
            f"{s['read_p99_ms']:.3f}",
        ),
        row(
            "reference (one .pkl per image, torch fp32)",
            f"{s['pickle_bytes']:.0f}",
            f"{s['pickle_disk']:.0f}",
            f"{s['pickle_read_ms']:.3f}",
            f"{s['pickle_p99_ms']:.3f}",
        ),
        "",
        f"Opening the store (mmap + id index): {s['open_ms']:.1f} ms. Whole benchmark: {total_s:.0f} s.",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    p.add_argument("--tiny-images", type=int, default=300, help="images for ovd-tiny")
    p.add_argument("--vit-images", type=int, default=24, help="images for ViT-B-32 (slow on CPU)")
    p.add_argument("--batch-size", type=int, default=256, help="crops per CLIP forward")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the ovd extraction")
    p.add_argument("--chunk-size", type=int, default=512, help="images per part file")
    p.add_argument("--naive-budget", type=float, default=30.0, help="seconds after which the naive loop stops")
    p.add_argument("--forward-crops", type=int, default=2048, help="max crops timed by the forward-only run")
    p.add_argument("--store-images", type=int, default=5000, help="images of the synthetic store")
    p.add_argument("--models", nargs="+", default=["ovd-tiny", "ViT-B-32"], help="open_clip architectures")
    p.add_argument("--device", default="cpu", help="where CLIP runs: cpu or cuda")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        help="resize backends of the ovd runs (auto, pil, tensor, batched), batched with options: batched:queue "
        "(no decode buffers), batched:float32 / batched:float16 (dtype of its matrix products; default: auto)",
    )
    p.add_argument("--unique-images", type=int, default=1000, help="distinct JPEGs generated (the rest are copies)")
    p.add_argument("--output", help="write the markdown report here")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(format="%(name)s: %(message)s")
    for name in ("ovd.distill.extract", "ovd.distill.extract_io"):  # waiting time, decode buffers, shared memory
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    total = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        work = Path(tmp)
        with Stopwatch() as gen:
            n_max = max(args.tiny_images if "ovd-tiny" in args.models else 0, args.vit_images)
            records, props = make_images(work, n_max, 640, 480, seed=0, unique=args.unique_images)
        rows = []
        for name in args.models:
            n = args.tiny_images if name == "ovd-tiny" else args.vit_images
            for r in bench_model(name, records[:n], props, work, args):
                rows.append(r)
                print(json.dumps(r), flush=True)
        store = bench_store(work, args.store_images)
        print(json.dumps(store), flush=True)
    emit_report(report(args, rows, store, gen.s, total.elapsed()), args.output)


if __name__ == "__main__":
    main()
