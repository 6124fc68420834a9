"""Benchmark: OpenVocabDetector vs torchvision's stock Faster R-CNN (R50-FPN) on CPU.

Both detectors get the same backbone (ResNet-50 with FrozenBatchNorm2d, stem + layer1 frozen, FPN 256
with a max-pool p6), the same RPN (anchors [[32],[64],[128],[256],[512]] x [0.5, 1, 2], torchvision's
default pre/post-NMS top-n: 2000/2000 in training, 1000/1000 at inference), the same RoI sampling
(512 per image, 25 % foreground), the same 7x7 MultiScaleRoIAlign (sampling ratio 2) and 2-FC 1024 box
head, and **the same weights** for all of these (ours are copied into torchvision's model), so both
see bit-identical backbone inputs, features and proposals (checked). What differs is exactly the
open-vocabulary part (plus each library's own input batching and proposal sampling): zero-shot
classifier (Linear 1024→512, cosine against C frozen text embeddings) + class-agnostic box MLP +
sigmoid BCE (+ federated loss for C ≥ --fed-loss-from) + sigmoid post-processing, against
torchvision's Linear(1024, C+1) + Linear(1024, 4(C+1)) + softmax CE + softmax post-processing.

Inference is made fair by giving both models the same number of (box, class) candidates entering the
per-class NMS (random weights would otherwise let ~all of our sigmoid scores and ~none of
torchvision's softmax scores pass 0.05): each model's score threshold is calibrated on the benchmark
image so that exactly --nms-candidates pairs pass it, and the count is checked by intercepting
``batched_nms``.

Besides the end-to-end training step and inference latency, every part that differs is timed alone on
the same captured inputs (input batching; proposal matching + sampling; head: RoI features → loss →
backward; head: RoI features → logits/boxes; head + post-processing: RoI features → detections).
Since everything else is the same computation on the same shapes, Σ(ours − torchvision) over those
parts ÷ torchvision's end-to-end time is a second, low-noise estimate of the overhead (the RPN box
loss, L1 vs smooth-L1 on ≤ 256 anchors per image, is left out as negligible).

    python benchmarks/bench_model.py --classes 80 1203 --output benchmarks/results/model.md
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from detector_pair import (  # benchmarks/detector_pair.py
    add_run_args,
    build_pair,
    calibrate,
    class_image_counts,
    hooks,
    infer_fn,
    make_inputs,
    profile_table,
    start,
    train_step_fn,
)
from machine import emit_report, load_average  # benchmarks/machine.py
from model_report import GOALS, report  # benchmarks/model_report.py
from timing import OURS, TV, Stopwatch, Summary, per_call, timed_interleaved  # benchmarks/timing.py
from torch import nn
from torchvision.models.detection import roi_heads as tv_roi_heads_module

# ------------------------------------------------------------------------------------------------
# One vocabulary size
# ------------------------------------------------------------------------------------------------


def bench_classes(num_classes: int, args: argparse.Namespace, log) -> dict[str, Any]:
    clock = Stopwatch()
    ours, tv, info = build_pair(num_classes, args)
    counts = class_image_counts(num_classes, args.seed)
    log(f"[C={num_classes}] built both models in {clock.elapsed():.1f} s")
    res: dict[str, Any] = {"info": info}
    rh_o, rh_t = ours.roi_heads, tv.roi_heads
    parts = lambda fns: per_call(fns, args.part_repeats, args.part_round_s)  # noqa: E731

    # ================= inference, batch 1 =================
    ours.eval()
    tv.eval()
    im_o, im_t, _, _ = make_inputs(1, args, num_classes, counts, args.seed + 1)
    stages = {
        OURS: {
            "backbone": ours.backbone,
            "rpn": ours.rpn,
            "roi_heads": rh_o,
            "pool": rh_o.region_features.pooler,
            "fc": rh_o.region_features.head,
        },
        TV: {"backbone": tv.backbone, "rpn": tv.rpn, "roi_heads": rh_t, "pool": rh_t.box_roi_pool, "fc": rh_t.box_head},
    }
    # the two calibration inferences per model are also the inference warm-up
    cal = calibrate(ours, tv, im_o, im_t, args.nms_candidates, stages)
    assert cal["backbone_in"][OURS] == cal["backbone_in"][TV], cal["backbone_in"]
    res["cal"] = {k: v for k, v in cal.items() if k not in ("x", "ours_head_in", "tv_head_in", "image_sizes")}
    res["stages_infer"] = cal["stages"]
    log(f"[C={num_classes}] calibration: {res['cal']}")

    res["infer"] = Summary(
        timed_interleaved({OURS: infer_fn(ours, im_o), TV: infer_fn(tv, im_t)}, 0, args.infer_repeats)
    )
    log(f"[C={num_classes}] inference ours {res['infer'].ours} tv {res['infer'].tv}")

    def linear_macs(*mods: nn.Linear) -> int:
        return sum(m.in_features * m.out_features for m in mods)

    res["macs"] = {  # multiply-adds per RoI after the shared 2-FC box head
        OURS: linear_macs(rh_o.classifier.linear, rh_o.box_regressor.fc1, rh_o.box_regressor.fc2)
        + rh_o.classifier.vocabulary.numel(),
        TV: linear_macs(rh_t.box_predictor.cls_score, rh_t.box_predictor.bbox_pred),
        "shared": linear_macs(rh_t.box_head.fc6, rh_t.box_head.fc7),
    }

    # the parts that differ, on the same inputs (RoI features captured from the run above)
    x = cal["x"]  # (R, 1024), identical in both models
    props, sizes = cal["ours_head_in"][2], cal["image_sizes"]
    tv_props, tv_shapes = cal["tv_head_in"][2], cal["tv_head_in"][3]

    def input_o():
        with torch.inference_mode():
            ours.preprocess(im_o)

    def input_t():
        with torch.inference_mode():
            tv.transform(im_t)

    def head_o():
        with torch.inference_mode():
            rh_o.classifier(x), rh_o.box_regressor(x)

    def head_t():
        with torch.inference_mode():
            rh_t.box_predictor(x)

    def head_post_o():
        with torch.inference_mode():
            rh_o.predict(rh_o.classifier(x), rh_o.box_regressor(x), props, sizes)

    def head_post_t():
        with torch.inference_mode():
            lg, dl = rh_t.box_predictor(x)
            rh_t.postprocess_detections(lg, dl, tv_props, tv_shapes)

    res["input_infer"] = parts({OURS: input_o, TV: input_t})
    res["head_infer"] = parts({OURS: head_o, TV: head_t})
    res["head_post"] = parts({OURS: head_post_o, TV: head_post_t})
    res["num_rois_test"] = int(x.shape[0])
    log(f"[C={num_classes}] inference parts done ({clock.elapsed():.0f} s)")

    # ================= training, batch --train-batch =================
    ours.train()
    tv.train()
    im_o, im_t, tg_o, tg_t = make_inputs(args.train_batch, args, num_classes, counts, args.seed + 2)
    cap: dict[str, Any] = {}
    with hooks(
        [
            (ours.backbone, "pre", lambda m, a: cap.__setitem__("ours_in", tuple(a[0].shape))),
            (tv.backbone, "pre", lambda m, a: cap.__setitem__("tv_in", tuple(a[0].shape))),
            (rh_o.region_features, "pre", lambda m, a: cap.__setitem__("ours_rois", [len(b) for b in a[1]])),
            (rh_o.region_features, "post", lambda m, a, o: cap.__setitem__("x", o.detach().clone())),
            (rh_t.box_roi_pool, "pre", lambda m, a: cap.__setitem__("tv_rois", [len(b) for b in a[1]])),
            (tv.rpn, "post", lambda m, a, o: cap.__setitem__("tv_props", [p.detach() for p in o[0]])),
            (ours.rpn, "post", lambda m, a, o: cap.__setitem__("ours_props", [p.detach() for p in o[0]])),
        ]
    ):
        ours(im_o, [dict(t) for t in tg_o])
        tv(im_t, [dict(t) for t in tg_t])
    assert cap["ours_in"] == cap["tv_in"], (cap["ours_in"], cap["tv_in"])
    res["train_shapes"] = {
        "backbone_in": cap["ours_in"],
        "proposals": {OURS: [len(p) for p in cap["ours_props"]], TV: [len(p) for p in cap["tv_props"]]},
        "proposals_same": all(
            a.shape == b.shape and bool((a == b).all()) for a, b in zip(cap["ours_props"], cap["tv_props"], strict=True)
        ),
        "rois": {OURS: cap["ours_rois"], TV: cap["tv_rois"]},
    }
    log(f"[C={num_classes}] training shapes {res['train_shapes']}")

    res["train"] = Summary(
        timed_interleaved(
            {OURS: train_step_fn(ours, im_o, tg_o, args.lr), TV: train_step_fn(tv, im_t, tg_t, args.lr)},
            args.warmup,
            args.repeats,
        )
    )
    log(f"[C={num_classes}] train ours {res['train'].ours} tv {res['train'].tv}")

    # the parts that differ: input batching, proposal matching + sampling, head → loss → backward
    tprops = cap["tv_props"]
    gt_boxes, gt_labels = [t["boxes"] for t in tg_o], [t["labels"] for t in tg_o]

    def tinput_o():
        ours.preprocess(im_o)
        [{k: v.to(ours.device) for k, v in t.items()} for t in tg_o]

    def tinput_t():
        tv.transform(im_t, [dict(t) for t in tg_t])

    def sample_o():
        return rh_o.sample_proposals(tprops, gt_boxes, gt_labels)

    def sample_t():
        with torch.no_grad():  # as in torchvision's RoIHeads (its sampling builds no graph either)
            return rh_t.select_training_samples(tprops, [dict(t) for t in tg_t])

    res["input_train"] = parts({OURS: tinput_o, TV: tinput_t})
    res["sampling"] = parts({OURS: sample_o, TV: sample_t})
    boxes_o, classes_o, matched_o = sample_o()
    props_t, _, labels_t, reg_t = sample_t()
    xt = cap["x"].requires_grad_()  # gradient w.r.t. the RoI features too, as in the full model
    r_o, r_t = sum(len(b) for b in boxes_o), sum(len(p) for p in props_t)
    assert r_o == r_t == xt.shape[0], (r_o, r_t, xt.shape)
    params_o = list(rh_o.classifier.parameters()) + list(rh_o.box_regressor.parameters())
    params_t = list(rh_t.box_predictor.parameters())

    def head_train_o():
        for p in [*params_o, xt]:
            p.grad = None
        losses = rh_o.losses(rh_o.classifier(xt), rh_o.box_regressor(xt), boxes_o, classes_o, matched_o)
        sum(losses.values()).backward()

    def head_train_t():
        for p in [*params_t, xt]:
            p.grad = None
        lg, dl = rh_t.box_predictor(xt)
        sum(tv_roi_heads_module.fastrcnn_loss(lg, dl, labels_t, reg_t)).backward()

    res["head_train"] = parts({OURS: head_train_o, TV: head_train_t})
    res["num_rois_train"] = int(xt.shape[0])
    log(f"[C={num_classes}] training parts done ({clock.elapsed():.0f} s)")

    # overhead estimated from the differing parts alone (everything else is the same computation on
    # the same shapes): Σ (ours − torchvision) / torchvision's end-to-end time
    res["diff_train"] = (res["input_train"].delta + res["sampling"].delta + res["head_train"].delta) / res[
        "train"
    ].med_tv
    res["diff_infer"] = (res["input_infer"].delta + res["head_post"].delta) / res["infer"].med_tv

    goal = GOALS.get(num_classes, max(GOALS.values()))
    over = max(res["train"].overhead, res["infer"].overhead, res["diff_train"], res["diff_infer"]) > goal
    if args.profile == "always" or (args.profile == "auto" and over):
        log(f"[C={num_classes}] profiling")
        res["profile"] = {
            "training step, ours": profile_table(train_step_fn(ours, im_o, tg_o, args.lr), args.profile_rows),
            "training step, torchvision": profile_table(train_step_fn(tv, im_t, tg_t, args.lr), args.profile_rows),
        }
        ours.eval()
        tv.eval()
        im_o, im_t, _, _ = make_inputs(1, args, num_classes, counts, args.seed + 1)
        res["profile"]["inference, ours"] = profile_table(infer_fn(ours, im_o), args.profile_rows)
        res["profile"]["inference, torchvision"] = profile_table(infer_fn(tv, im_t), args.profile_rows)
    res["seconds"] = clock.elapsed()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[80, 1203], help="vocabulary sizes C to benchmark")
    parser.add_argument(
        "--size", type=int, nargs=2, default=[320, 320], metavar=("H", "W"), help="input image size, both models"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds of the training step")
    parser.add_argument("--infer-repeats", type=int, default=5, help="timed interleaved rounds of inference")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up training steps per model")
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step")
    parser.add_argument("--gt-per-image", type=int, default=8, help="random ground-truth boxes per training image")
    parser.add_argument(
        "--nms-candidates",
        type=int,
        default=1000,
        help="(box, class) pairs per image entering the RoI NMS in both models (score thresholds are calibrated)",
    )
    parser.add_argument(
        "--sampling-ratio", type=int, default=2, help="RoIAlign sampling ratio of our pooler (torchvision's is 2)"
    )
    parser.add_argument(
        "--fed-loss-from",
        type=int,
        default=1000,
        help="use the LVIS classifier recipe (logit bias, fed loss) when C ≥ this",
    )
    parser.add_argument("--lr", type=float, default=1e-6, help="SGD learning rate of the timed training steps")
    parser.add_argument("--part-repeats", type=int, default=7, help="interleaved rounds of each part row")
    parser.add_argument(
        "--part-round-s", type=float, default=0.2, help="target seconds per round of a part row (sets calls per round)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="torch.profiler tables for one run of each model; auto = only when a goal is missed",
    )
    parser.add_argument("--profile-rows", type=int, default=20, help="ops per profiler table")
    add_run_args(parser)
    args = parser.parse_args(argv)
    log = start(args)

    load0 = load_average()
    with Stopwatch() as whole:
        results = {c: bench_classes(c, args, log) for c in args.classes}
    lines = report(args, sys.argv[1:] if argv is None else argv, results, whole.s, (load0, load_average()))
    emit_report(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
