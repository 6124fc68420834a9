"""The typed schema of a run's configuration: model, CLIP, input, data, solver and test sections.

Every number that changes a result is a field here, with a one-line doc. Defaults reproduce the
reference's OV-COCO R50-C4 recipe (METHOD §1.2) unless a comment says otherwise. :data:`RESULT_NEUTRAL`
lists the fields that cannot change a result (every other field is fingerprinted, ovd.engine.fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClipCfg:
    """The CLIP model that provides class text embeddings (and region embeddings for RKD)."""

    model: str = "ViT-B-32"  # open_clip architecture name (METHOD §11: OpenAI ViT-B/32)
    pretrained: str = "openai"  # open_clip pretrained tag, or a path to a local checkpoint file
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}"])  # prompts, "{}" = name
    # Precomputed (C, D) class embeddings (.npy, our format or the reference's). When set, the text
    # encoder is not run; rows must follow the training dataset's class order.
    embeddings: str = ""
    cache_dir: str = ""  # where computed text embeddings are cached ("" = <output_dir>/text_embeddings)


@dataclass(frozen=True)
class BackboneCfg:
    """Feature extractor."""

    name: str = "resnet50_c4"  # resnet50_c4 | resnet50_fpn | resnet18_fpn | tiny_fpn
    norm: str = "frozen_bn"  # frozen_bn | bn | gn: normalisation layers of the ResNet trunk
    freeze_at: int = 2  # 0 = train all; 1 = freeze stem; 2 = stem + res2 (detectron2 FREEZE_AT)
    # ImageNet initialisation: "" (random), a local torchvision-format state_dict file, detectron2's MSRA
    # "R-50.pkl" (a *.pkl path; use with stride_in_1x1 and BGR input), or "torchvision" (torchvision's
    # IMAGENET1K_V1 weights, which must already be in the torch cache).
    weights: str = ""
    fpn_channels: int = 256  # FPN output channels (FPN backbones only)
    fpn_min_level: int = 2  # finest FPN level: 2 = p2..p6 (stride 4, METHOD §1.4), 3 = p3..p6 (cheaper)
    tiny_widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # tiny_fpn stage widths
    # MSRA/caffe ResNet (detectron2 STRIDE_IN_1X1): a downsampling bottleneck strides in its first 1x1
    # conv, not in the 3x3 (torchvision's "v1.5"); the weights are the same shapes, the features are not.
    stride_in_1x1: bool = False


@dataclass(frozen=True)
class RPNCfg:
    """Region proposal network (torchvision's RegionProposalNetwork)."""

    # Anchor sizes per feature level; one inner list per level (C4: one level with 5 sizes).
    anchor_sizes: list[list[int]] = field(default_factory=lambda: [[32, 64, 128, 256, 512]])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # h/w ratios
    fg_iou_thresh: float = 0.7  # anchor IoU ≥ this → foreground
    bg_iou_thresh: float = 0.3  # anchor IoU < this → background
    batch_size_per_image: int = 256  # anchors sampled per image for the loss
    positive_fraction: float = 0.5  # max share of foreground in the sampled anchors
    pre_nms_top_n_train: int = 12000  # top-scoring anchors kept per level before NMS, training
    post_nms_top_n_train: int = 2000  # proposals kept per image after NMS, training
    pre_nms_top_n_test: int = 6000  # same, inference
    post_nms_top_n_test: int = 1000  # same, inference
    nms_thresh: float = 0.7  # NMS IoU on proposals
    smooth_l1_beta: float = 0.0  # RPN box loss beta; 0 = L1 (detectron2), torchvision uses 1/9
    loss_weight: float = 1.0  # multiplies both RPN losses
    # torchvision: cell anchors rounded to integers, ratio-major order, strides inferred from the padded
    # image; detectron2: unrounded cell anchors, size-major order, the fixed strides of the backbone
    # levels, offset 0 (ovd.modeling.anchors). The order is the RPN head's anchor channel order.
    anchor_style: str = "torchvision"  # torchvision | detectron2
    # rank proposals for NMS by objectness logits (detectron2) instead of sigmoid probabilities (torchvision),
    # which float32 rounds into ties above a logit of about 5
    nms_on_logits: bool = False
    min_size: float = 1e-3  # proposals narrower or lower than this (px) are dropped; 0 = keep all non-empty (d2)


@dataclass(frozen=True)
class RoIHeadsCfg:
    """Second stage: proposal sampling, RoI pooling, box head, class-agnostic box regression."""

    pooler_resolution: int = 14  # RoIAlign output size (C4: 14, FPN: 7)
    pooler_sampling_ratio: int = 0  # RoIAlign sampling points per bin (0 = adaptive)
    pooler_aligned: bool = True  # half-pixel alignment (ROIAlignV2); C4 only, FPN pooler is unaligned
    fpn_pooler_aligned: bool = False  # half-pixel alignment of the FPN box and mask poolers (d2 ROIAlignV2)
    # FPN level assignment of RoIs: a box of side canonical_box_size px is pooled from p{canonical_level}
    # (FPN eq. 1: k = canonical_level + log2(sqrt(area) / canonical_box_size), clamped to the levels)
    canonical_box_size: int = 224
    canonical_level: int = 4
    fc_dim: int = 1024  # FC box head width (FPN backbones)
    num_fc: int = 2  # FC layers of the box head (FPN backbones)
    batch_size_per_image: int = 512  # proposals sampled per image for the loss
    positive_fraction: float = 0.25  # max share of foreground proposals
    fg_iou_thresh: float = 0.5  # proposal IoU ≥ this → foreground
    bg_iou_thresh: float = 0.5  # proposal IoU < this → background
    add_gt_as_proposals: bool = True  # append GT boxes to the proposals during training
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # (wx, wy, ww, wh)
    smooth_l1_beta: float = 0.0  # box regression loss beta; 0 = L1 (METHOD §10.10)
    box_loss_weight: float = 1.0  # multiplies the box regression loss
    score_thresh_test: float = 0.05  # drop detections below this score
    nms_thresh_test: float = 0.5  # per-class NMS IoU at inference
    detections_per_image: int = 100  # top-k detections kept per image


@dataclass(frozen=True)
class ClassifierCfg:
    """Zero-shot classifier: cosine logits against CLIP text embeddings (METHOD §2)."""

    temperature: float = 50.0  # τ multiplying cosine similarities (NORM_TEMP)
    use_bias: bool = False  # add a learnable scalar bias to every logit (LVIS recipe)
    bias_init: float = -4.6  # initial bias; sigmoid(-4.6) ≈ 0.01
    cls_loss_weight: float = 1.0  # multiplies the sigmoid BCE classification loss
    ignore_zero_cats: bool = True  # mask classes with no training image out of the loss (§2.3)
    freq_weight_power: float = 0.5  # class frequency = image_count ** power (§10.3)
    zero_freq_thresh: float = 1e-4  # frequency ≤ this counts as "no training image"
    use_fed_loss: bool = False  # federated loss: only appeared + sampled classes get negatives (§2.3)
    fed_loss_num_classes: int = 50  # classes per batch under the federated loss
    # Weight transfer (METHOD §5): classify with fc4(σ(fc3(x))) + x·fc2(σ(fc1(W_rkd)))ᵀ, W_rkd frozen
    # (initialise from the RKD stage: init_weights / init_stage).
    weight_transfer: bool = False
    weight_transfer_hidden_dim: int = 1024  # width of the residual MLP fc3 → fc4
    weight_transfer_negative_slope: float = 0.1  # slope of the LeakyReLU σ


@dataclass(frozen=True)
class DistillCfg:
    """Region-based knowledge distillation (RKD, METHOD §3): student region embeddings → CLIP's."""

    enabled: bool = False  # add the L1 and IRM losses on the stored regions (needs data.region_store)
    num_regions: int = 5  # stored regions used per image (NUM_DISTIL_PROP)
    l1_weight: float = 0.15  # λ_L1 of mean |n(S) − n(T)| over R·D elements (LVIS recipe: 0.25)
    irm_weight: float = 0.15  # λ_IRM of ‖G_S − G_T‖_F², a sum over R² entries (LVIS recipe: 0.13)
    # IRM is a Frobenius sum over the R×R region pairs of a group of images, averaged over the groups of a
    # batch. The reference's group is its per-GPU batch (2 images); 0 = the whole per-rank batch.
    irm_group_images: int = 2
    # Multiplies both weights: the reference's hidden rkd_temperature, so the effective weights
    # are 15 and 15 on COCO (METHOD §3.5).
    weight_scale: float = 100.0
    # Teacher-aware RKD (beyond the reference, issue #22; ovd.distill.region_weights). Per-region weights
    # from the teacher's posterior softmax(cos / T) over the training vocabulary: uniform (the reference) |
    # max_prob | entropy (1 − H/log C); computed once per store and setting, kept in the store.
    region_weighting: str = "uniform"
    weight_temperature: float = 0.01  # T of that softmax (0.01 = CLIP's logit scale 100)
    weight_floor: float = 0.0  # a confidence weight is at least this
    # Contradiction filter: a region the teacher calls a base class, whose best-matching ground-truth box
    # (IoU ≥ contradiction_iou) does not have that class, gets weight × contradiction_weight (0 = dropped).
    # 0 = off; 0.5 = the box head's foreground IoU, so it drops regions the box loss trains against.
    contradiction_iou: float = 0.0
    contradiction_weight: float = 0.0


@dataclass(frozen=True)
class ImageLabelCfg:
    """Losses on image-labelled batches (PIS, METHOD §4.4): the source's ``supervision`` picks one."""

    # Weight of the image-level loss: "pseudo" sources use the pseudo max-score loss on their pseudo
    # boxes (PMS_LOSS_WEIGHT), "image" sources Detic's max-size loss on the largest RPN proposal.
    loss_weight: float = 0.1
    max_size_num_proposals: int = 128  # "image" sources: RPN proposals among which the largest is taken


@dataclass(frozen=True)
class MaskHeadCfg:
    """Class-agnostic mask head of Mask R-CNN (METHOD §1.4, FPN backbones only)."""

    enabled: bool = False  # add the mask head: mask loss on box-supervised batches, masks at inference
    pooler_resolution: int = 14  # RoIAlign output size; the predicted masks are twice as large (28)
    num_conv: int = 4  # 3x3 conv + ReLU layers before the 2x deconvolution
    conv_dim: int = 256  # channels of those convs and of the deconvolution
    loss_weight: float = 1.0  # multiplies the per-pixel mask BCE
    # how masks are pasted into the image for evaluation: torchvision (1-px padded box, rounded to integers,
    # resized) or detectron2 (each pixel centre sampled from the mask inside the exact box, grid_sample)
    paste: str = "torchvision"  # torchvision | detectron2


@dataclass(frozen=True)
class ModelCfg:
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    rpn: RPNCfg = field(default_factory=RPNCfg)
    roi_heads: RoIHeadsCfg = field(default_factory=RoIHeadsCfg)
    classifier: ClassifierCfg = field(default_factory=ClassifierCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    image_label: ImageLabelCfg = field(default_factory=ImageLabelCfg)
    mask: MaskHeadCfg = field(default_factory=MaskHeadCfg)
    # Channel order the network sees: RGB (torchvision) or BGR (detectron2 / MSRA caffe weights, which
    # also use pixel_std [1, 1, 1]); images always enter as RGB and are flipped for BGR.
    input_format: str = "RGB"  # RGB | BGR
    # pixel statistics on a 0–255 scale, in input_format's channel order (torchvision ImageNet weights).
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32  # pad batched images to a multiple of this (0 = only to the batch's largest)


@dataclass(frozen=True)
class InputCfg:
    """Image resizing and augmentation."""

    min_size_train: list[int] = field(default_factory=lambda: [800])  # short-side choices (or [lo, hi])
    min_size_train_sampling: str = "choice"  # choice | range
    # one short side per batch instead of per image: no image is zero-padded up to a larger one of its
    # batch (per image, a batch of 8 short sides in [224, 288] pads to 288: ~25 % more pixels)
    size_per_batch: bool = False
    max_size_train: int = 1333  # cap on the long side, training
    min_size_test: int = 800  # short side at inference
    max_size_test: int = 1333  # cap on the long side at inference
    flip_prob: float = 0.5  # horizontal flip probability, training


SUPERVISIONS = ("box", "pseudo", "image")


@dataclass(frozen=True)
class SourceCfg:
    """One training source of a multi-source run (METHOD §1.5): a dataset and how it is used."""

    dataset: str = ""  # catalog name
    # box: detection losses on its boxes; pseudo: the pseudo max-score loss on its pseudo boxes
    # (a dataset of ann_type "pseudo"); image: Detic's max-size loss on its image-level labels.
    supervision: str = "box"
    ratio: float = 1.0  # sampling ratio: the source gets ratio / Σ ratios of the sampled images
    batch_size: int = 2  # images per batch on each rank (a batch holds one source only)
    min_size: list[int] = field(default_factory=list)  # training short sides; [] = input.min_size_train
    max_size: int = 0  # training long-side cap; 0 = input.max_size_train
    region_store: str = ""  # RKD regions of this source's images ("" = no distillation on it)
    repeat_threshold: float = 0.0  # LVIS repeat-factor sampling threshold t (0 = off; LVIS: 0.001)


@dataclass(frozen=True)
class CustomDatasetCfg:
    """A COCO-format dataset of your own, registered in the catalog under ``name`` (``ovd.data.custom``)."""

    name: str = ""  # catalog name, used by data.train / data.test / data.sources[].dataset
    ann_file: str = ""  # COCO JSON; relative paths are under $OVD_DATASETS
    image_root: str = ""  # folder that the annotation's file_name entries are relative to
    novel_classes: list[str] = field(default_factory=list)  # category names held out as novel; the rest are base
    ann_type: str = "box"  # box | image (pos_category_ids only) | pseudo (one pseudo box per image label)
    evaluator: str = "coco_ovd"  # coco_ovd | lvis: the metric it is scored with (ovd.evaluation.evaluator)


@dataclass(frozen=True)
class DataCfg:
    # Datasets of your own, registered before anything reads the catalog (README: "Your own dataset").
    custom: list[CustomDatasetCfg] = field(default_factory=list)
    # Multi-source training (PIS): when non-empty, replaces `train`/`region_store` and
    # solver.ims_per_batch (each source has its own batch size).
    sources: list[SourceCfg] = field(default_factory=list)
    train: str = "coco_ovd_train"  # catalog name of the box-annotated training set
    test: str = "coco_ovd_val"  # catalog name of the evaluation set
    num_workers: int = 2  # DataLoader worker processes per rank
    check_images: bool = True  # before iteration 0, check that every training image file exists
    # An image that is missing or cannot be decoded during training: error (stop, naming it) | skip (train
    # on the next image instead, logged and counted as train/skipped_images; missing files found by
    # check_images are dropped up front, counted too). More than max_bad_images skips is an error.
    bad_images: str = "error"
    max_bad_images: int = 100
    # Region store of data.train (boxes + CLIP embeddings, tools/extract_region_embeddings.py),
    # read when model.distill.enabled.
    region_store: str = ""


@dataclass(frozen=True)
class SolverCfg:
    """SGD with linear warm-up and multi-step decay (METHOD §1.2)."""

    ims_per_batch: int = 16  # total images per iteration, summed over all ranks
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # weight decay of normalisation-layer parameters
    warmup_iters: int = 1000
    warmup_factor: float = 0.001  # LR multiplier at iteration 0 of the warm-up
    steps: list[int] = field(default_factory=lambda: [60000, 80000])  # iterations where LR *= gamma
    gamma: float = 0.1
    max_iter: int = 90000
    checkpoint_period: int = 10000  # save every N iterations (and always at the end)
    clip_grad_norm: float = 0.0  # max global gradient norm; 0 = no clipping
    amp: bool = False  # mixed-precision training: autocast to amp_dtype
    # float16: CUDA only, with a GradScaler (on a CPU training stays float32, with a warning);
    # bfloat16: CUDA or CPU, no scaler (fast on CPUs with AVX512-BF16 or AMX, emulated and slow elsewhere)
    amp_dtype: str = "float16"


@dataclass(frozen=True)
class TestCfg:
    eval_period: int = 0  # evaluate every N iterations during training (0 = only at the end)
    batch_size: int = 1  # images per inference batch per rank
    # Also report student-vs-CLIP fidelity on the test set's ground-truth regions (cosine, zero-shot
    # top-1 agreement, base vs novel); runs the CLIP image encoder of `clip` on those crops.
    region_fidelity: bool = False


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run."""

    model: ModelCfg = field(default_factory=ModelCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)
    input: InputCfg = field(default_factory=InputCfg)
    data: DataCfg = field(default_factory=DataCfg)
    solver: SolverCfg = field(default_factory=SolverCfg)
    test: TestCfg = field(default_factory=TestCfg)
    init_weights: str = ""  # checkpoint whose model weights initialise training (a previous stage)
    # In a pipeline (tools/run_pipeline.py): the stage whose final checkpoint initialises this recipe;
    # the pipeline turns it into init_weights. Ignored by a plain train_net.py run.
    init_stage: str = ""
    seed: int = 0  # seeds model init, data order and augmentation
    log_period: int = 20  # iterations between TensorBoard / log writes
    device: str = "auto"  # auto | cpu | cuda
    # torch intra-op CPU threads (0 = torch's default). On small shared CPUs 1 thread is far more
    # robust: 2 threads on a loaded 2-core machine ran 10x slower than 1 (OV-Shapes recipe).
    num_threads: int = 0


BAD_IMAGE_POLICIES = ("error", "skip")  # data.bad_images

# Fields that cannot change a result: how often to log, save or evaluate along the way, how many loader
# workers / CPU threads and which device run it (the same numbers up to float rounding), where caches go.
# Every other field is result-changing: an output folder, a resume or a cache made with another value
# is never reused (ovd.engine.fingerprint).
RESULT_NEUTRAL = frozenset(
    {
        "log_period",
        "num_threads",
        "device",
        "data.num_workers",
        "data.check_images",
        "solver.checkpoint_period",
        "test.eval_period",
        "clip.cache_dir",
        "init_stage",  # the pipeline resolves it into init_weights, whose file is fingerprinted
    }
)
# Result-changing fields that --resume may still change: training longer, and what the final model
# is evaluated on (neither changes the iterations already in the checkpoint).
RESUME_MAY_CHANGE = ("solver.max_iter", "data.test", "test.")
