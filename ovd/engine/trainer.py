"""The training loop: SGD + warm-up/multi-step LR, optional AMP and gradient clipping, DDP through
``torchrun``, TensorBoard scalars, atomic checkpoints and exact resumption."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ovd.config import Config, SolverCfg, config_to_yaml, save_config
from ovd.data.catalog import DatasetInfo, get_dataset
from ovd.data.coco import category_image_counts, load_dataset
from ovd.data.custom import register_custom_datasets
from ovd.data.transforms import ResizeFlipAugmentation
from ovd.engine import distributed as dist
from ovd.engine.bad_images import count_skipped
from ovd.engine.checkpoint import (
    last_checkpoint,
    load_checkpoint,
    load_model_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from ovd.engine.evaluate import evaluate
from ovd.engine.fingerprint import check_resume, run_fingerprint, write_fingerprint
from ovd.engine.schedule import lr_factor
from ovd.engine.sources import build_source_loader, train_sources, weight_regions
from ovd.engine.vocabulary import class_embeddings
from ovd.errors import OVDError
from ovd.modeling.build import WEIGHT_TRANSFER_NEW_KEYS, build_model
from ovd.modeling.detector import OpenVocabDetector
from ovd.runtime.detector import load_trained_detector
from ovd.runtime.device import local_device
from ovd.utils.lock import holds_output_lock

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
_TARGET_KEYS = ("boxes", "labels", "pos_labels", "masks", "distill_boxes", "distill_embeddings", "distill_weights")


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(solver: SolverCfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training on ``device`` (``solver.amp`` / ``solver.amp_dtype``), None for float32.

    Raises:
        OVDError: ``solver.amp_dtype`` is not float16 or bfloat16.
    """
    if solver.amp_dtype not in AMP_DTYPES:
        raise OVDError(f"unknown {solver.amp_dtype!r} (valid: {', '.join(AMP_DTYPES)})", field="solver.amp_dtype")
    if not solver.amp:
        return None
    dtype = AMP_DTYPES[solver.amp_dtype]
    if dtype is torch.float16 and device.type != "cuda":
        logger.warning(
            "solver.amp: float16 autocast runs on CUDA only; training in float32 on %s "
            "(solver.amp_dtype=bfloat16 gives mixed precision there)",
            device.type,
        )
        return None
    return dtype


def build_optimizer(solver: SolverCfg, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum; normalisation-layer parameters get ``weight_decay_norm``."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, _NORM_TYPES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": solver.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": solver.weight_decay_norm})
    return torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum)


def train_augmentation(cfg: Config) -> ResizeFlipAugmentation:
    i = cfg.input
    return ResizeFlipAugmentation(
        tuple(i.min_size_train),
        i.max_size_train,
        sample_style=i.min_size_train_sampling,
        flip_prob=i.flip_prob,
    )  # type: ignore[arg-type]


def _unwrap(model: nn.Module) -> OpenVocabDetector:
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]


def build_detector_for_dataset(
    cfg: Config, dataset: str, output_dir: Path
) -> tuple[OpenVocabDetector, Any, torch.Tensor]:
    """(model, (dataset info, records), class embeddings) for training on the box dataset ``dataset``."""
    info = get_dataset(dataset)
    records = load_dataset(info)
    model, emb = _build_detector(cfg, info, category_image_counts(records, info.num_classes), output_dir)
    return model, (info, records), emb


def _build_detector(
    cfg: Config, info: DatasetInfo, image_counts: Any, output_dir: Path
) -> tuple[OpenVocabDetector, torch.Tensor]:
    counts = torch.as_tensor(image_counts)
    # Rank 0 computes (or reads) the embeddings and shares them, so every rank holds the same
    # vocabulary even with a randomly initialised text encoder.
    emb = class_embeddings(cfg.clip, info.class_names, output_dir) if dist.is_main_process() else None
    emb = dist.all_gather_objects(emb)[0]
    return build_model(cfg, class_embeddings=emb, class_image_counts=counts), emb


def checkpoint_state(model: nn.Module, cfg: Config, class_names: tuple[str, ...], emb: torch.Tensor) -> dict[str, Any]:
    return {
        "model": _unwrap(model).state_dict(),
        "config": config_to_yaml(cfg),
        "vocabulary": {"class_names": list(class_names), "embeddings": emb.float().cpu()},
    }


@holds_output_lock
def train(cfg: Config, output_dir: str | os.PathLike[str], *, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` in ``output_dir``; with ``resume``, continue from its last checkpoint exactly.

    Returns the final evaluation metrics (empty if ``data.test`` is empty).

    Raises:
        OVDError: among others, another run writes into ``output_dir`` (its lock is held while training),
            or ``resume`` finds a checkpoint trained with other result-changing config fields.
    """
    register_custom_datasets(cfg.data.custom)
    device = local_device(cfg.device)
    dist.init_distributed(device)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out = Path(output_dir)
    ckpt = last_checkpoint(out) if resume else None
    resumed = load_checkpoint(ckpt) if ckpt is not None else None
    if resumed is not None:
        check_resume(cfg, resumed, ckpt)  # before config.yaml is rewritten
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_fingerprint(out, run_fingerprint(cfg))  # first: a folder with a config.yaml has its fingerprint
        save_config(cfg, out / "config.yaml")
        remove_partial_checkpoints(out)  # a killed run's unfinished writes (this run holds the folder's lock)
    torch.manual_seed(cfg.seed)
    world = dist.get_world_size()
    sources = train_sources(cfg, world)
    info = sources[0].info
    # the classes a box loss may train: image counts over the box sources only (METHOD §2.3)
    box_records = [r for s in sources if s.cfg.supervision == "box" for r in s.records]
    counts = category_image_counts(box_records, info.num_classes)
    model, emb = _build_detector(cfg, info, counts, out)
    if cfg.model.distill.enabled:
        weight_regions(cfg, sources, emb, counts)
    model.to(device)
    loss_names = sorted({k for s in sources for k in model.loss_names(s.cfg.supervision)})

    solver = cfg.solver
    optimizer = build_optimizer(solver, model)
    schedule = functools.partial(
        lr_factor,
        warmup_iters=solver.warmup_iters,
        warmup_factor=solver.warmup_factor,
        steps=list(solver.steps),
        gamma=solver.gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast_dtype = amp_dtype(solver, device)  # None: float32
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype is torch.float16)  # bfloat16 needs no scaling

    start_iter = 0
    if ckpt is not None and resumed is not None:
        state = resumed
        load_model_state(model, state["model"], source=str(ckpt))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        if "rng" in state:
            _set_rng_state(state["rng"])
        logger.info("resumed from %s at iteration %d", ckpt, start_iter)
    elif cfg.init_weights:
        state = load_checkpoint(cfg.init_weights)
        # a weight-transfer model starts from an RKD checkpoint, which has no fc1-fc4 yet (METHOD §5)
        new = WEIGHT_TRANSFER_NEW_KEYS if cfg.model.classifier.weight_transfer else ()
        load_model_state(model, state["model"], source=cfg.init_weights, allow_missing=new)

    if world > 1:
        # batches of different supervision leave different parameters unused (METHOD §1.5)
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=len({s.cfg.supervision for s in sources}) > 1,
        )

    def save(iteration: int) -> None:
        if dist.is_main_process():
            state = checkpoint_state(model, cfg, info.class_names, emb)
            state.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                iteration=iteration,
                rng=_rng_state(),
            )
            name = "model_final.pth" if iteration == solver.max_iter else f"model_{iteration:07d}.pth"
            save_checkpoint(out / name, state)
        dist.synchronize()

    loader = build_source_loader(cfg, sources, start_iter)
    writer = SummaryWriter(str(out / "tensorboard")) if dist.is_main_process() else None
    bar = tqdm(
        total=solver.max_iter,
        initial=start_iter,
        desc="train",
        disable=not dist.is_main_process(),
        dynamic_ncols=True,
    )
    model.train()
    data_iter = iter(loader)
    skipped_images = 0  # unreadable images replaced in this run (data.bad_images=skip)
    for iteration in range(start_iter, solver.max_iter):
        t0 = time.perf_counter()
        batch = next(data_iter)
        skipped_images += count_skipped(batch, skipped_images, cfg.data.max_bad_images)
        images = [b["image"] for b in batch]
        targets = [{k: b[k] for k in _TARGET_KEYS if k in b} for b in batch]
        supervision = sources[batch[0].get("source", 0)].cfg.supervision
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            losses = model(images, targets, supervision)
        losses = {k: v.float() for k, v in losses.items()}  # summed and logged in float32 under any autocast
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"loss became {total.item()} at iteration {iteration}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                + "; lower solver.base_lr or enable solver.clip_grad_norm"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if solver.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), solver.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # a float16 GradScaler skips the optimizer step of an iteration whose gradients overflowed (the
            # first ones, while it finds its scale); the schedule follows iterations regardless, as in
            # detectron2, so torch's "scheduler stepped before optimizer" warning does not apply
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
        step = iteration + 1
        if step % cfg.log_period == 0 or step == solver.max_iter:
            # every rank logs the same keys: losses its batch did not have count as 0
            values = {k: float(losses[k].item()) if k in losses else 0.0 for k in loss_names}
            scalars = dist.reduce_mean(values | {"total_loss": total.item()})
            if writer is not None:
                for k, v in scalars.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/iter_time", time.perf_counter() - t0, step)
                writer.add_scalar("train/skipped_images", skipped_images, step)
            bar.set_postfix(loss=f"{scalars['total_loss']:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if step % solver.checkpoint_period == 0 or step == solver.max_iter:
            save(step)
        if cfg.test.eval_period and step % cfg.test.eval_period == 0 and step != solver.max_iter and cfg.data.test:
            # a mid-run evaluation must not change the run (test.eval_period is result-neutral): its data
            # loader draws from the global generator, so the random state is put back afterwards
            rng = _rng_state()
            _log_metrics(
                writer,
                evaluate(_unwrap(model), get_dataset(cfg.data.test), cfg, out / f"eval_{step:07d}"),
                step,
            )
            _set_rng_state(rng)
            model.train()
    bar.close()
    metrics: dict[str, Any] = {}
    if cfg.data.test:
        metrics = evaluate(_unwrap(model), get_dataset(cfg.data.test), cfg, out / "eval")
        _log_metrics(writer, metrics, solver.max_iter)
    if writer is not None:
        writer.close()
    if skipped_images:
        logger.warning("data.bad_images=skip: %d unreadable image reads were skipped", skipped_images)
        metrics["skipped_images"] = skipped_images
    return metrics


def _rng_state() -> dict[str, Any]:
    """Random state of the sampling inside the model (proposal sampling), for exact resumption."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _log_metrics(writer: SummaryWriter | None, metrics: dict[str, Any], step: int) -> None:
    if writer is None:
        return
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            writer.add_scalar(f"eval/{k}", v, step)


def evaluate_checkpoint(cfg: Config, weights: str, output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``--eval-only``: load ``weights`` into the model of ``cfg`` and evaluate on ``data.test``."""
    register_custom_datasets(cfg.data.custom)
    device = local_device(cfg.device)
    dist.init_distributed(device)
    out = Path(output_dir)
    info = get_dataset(cfg.data.test)
    loaded = load_trained_detector(
        weights,
        device=device,
        cfg=cfg,
        vocabulary=info.class_names,  # the checkpoint's own embeddings when it was trained on these names
        encode=lambda names: class_embeddings(cfg.clip, names, out),
    )
    return evaluate(loaded.model, info, cfg, out / "eval")
