"""Multi-stage pipelines: prepare data → teacher CLIP → detector stages → demo → ablation table.

A pipeline file (``configs/*/pipeline.yaml``) lists detector stages, each a recipe in ``configs/``;
a recipe names the stage it starts from with ``init_stage``. Running a pipeline again skips
finished stages (those with ``eval/metrics.json``) and resumes unfinished ones from their last
checkpoint, when their recorded fingerprints match (else an error; ``--rerun-changed``). With
``parallel_stages: N`` up to N stages whose start points are done train at once, each in its own
process (stages are seeded, so the numbers are those of a sequential run).
What the stages share (caption tags, one region store per image set, pseudo labels) is made by
:mod:`ovd.prepare` and reused only when its provenance matches; a pre-flight check
(:mod:`ovd.preflight`) of every input comes before anything trains; :mod:`ovd.smoke` cuts a run down.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ovd.config import (
    Config,
    CustomDatasetCfg,
    PipelineCfg,
    StageCfg,
    check_parallel_stages,
    load_config,
    load_pipeline,
)
from ovd.data.catalog import get_dataset
from ovd.data.custom import register_custom_datasets
from ovd.errors import OVDError
from ovd.preflight import check_pipeline
from ovd.prepare import (
    StorePlan,
    ensure_caption_tags,
    ensure_pseudo_labels,
    ensure_store,
    makes_caption_tags,
    plan_stores,
)
from ovd.smoke import smoke_overrides
from ovd.utils.io import write_json
from ovd.utils.lock import holds_output_lock

logger = logging.getLogger(__name__)

METRIC_KEYS = ("AP50_novel", "AP50_base", "AP50_all", "AP")  # OV-COCO-style rows
LVIS_BOX_KEYS = ("APr", "APc", "APf", "AP")  # LVIS-style rows: these box metrics ...
LVIS_MASK_KEYS = ("APr", "AP")  # ... then these mask ones, as mask_APr, mask_AP
LVIS_KEYS = (*LVIS_BOX_KEYS, *(f"mask_{k}" for k in LVIS_MASK_KEYS))


def stage_config(
    pipeline_file: Path,
    stage: StageCfg,
    output_dir: Path,
    extra: list[str],
    store: Path,
    source_stores: dict[str, Path] | None = None,
) -> Config:
    """The recipe of ``stage`` with ``init_stage`` resolved into ``init_weights`` and, for a
    distillation recipe, the pipeline's region ``store`` wherever the recipe names none (the store of
    ``source_stores[dataset]`` for a source of that dataset: images of their own)."""
    cfg = load_config(pipeline_file.parent / stage.config, [*stage.overrides, *extra])
    if cfg.init_stage:
        cfg = replace(cfg, init_weights=str(output_dir / cfg.init_stage / "model_final.pth"))
    if cfg.model.distill.enabled:
        own = source_stores or {}
        sources = [
            s if s.region_store else replace(s, region_store=str(own.get(s.dataset, store))) for s in cfg.data.sources
        ]
        cfg = replace(cfg, data=replace(cfg.data, region_store=cfg.data.region_store or str(store), sources=sources))
    return cfg


def regions_path(output_dir: Path, dataset: str) -> Path:
    return output_dir / "regions" / dataset


def _stage_datasets(cfg: Config) -> list[str]:
    train = [s.dataset for s in cfg.data.sources] if cfg.data.sources else [cfg.data.train]
    return [*train, *([cfg.data.test] if cfg.data.test else [])]


def _reads_pseudo_labels(pipe: PipelineCfg, cfg: Config) -> bool:
    """Whether a stage trains on the pipeline's pseudo-labelled dataset."""
    return bool(pipe.pseudo_labels.dataset) and any(s.dataset == pipe.pseudo_labels.name for s in cfg.data.sources)


def _proposal_stage(pipe: PipelineCfg) -> str | None:
    """The stage whose final checkpoint proposes the regions (None: none, or a results file)."""
    p = pipe.regions.proposals
    return p if p and not p.endswith(".json") else None


def pseudo_labels_path(output_dir: Path, name: str) -> Path:
    return output_dir / "pseudo_labels" / f"{name}.json"


def register_pseudo_dataset(pipe: PipelineCfg, output_dir: Path) -> None:
    """Register ``pseudo_labels.name``: the images of ``pseudo_labels.dataset`` with the pipeline's
    pseudo-label file (written later by :func:`ovd.prepare.ensure_pseudo_labels`)."""
    from ovd.data.catalog import register_dataset

    p = pipe.pseudo_labels
    if not p.dataset:
        return
    if not p.name:
        raise OVDError("pseudo_labels.dataset is set but pseudo_labels.name is empty", field="pseudo_labels.name")
    source = get_dataset(p.dataset)
    path = pseudo_labels_path(output_dir, p.name)
    register_dataset(
        replace(source, name=p.name, ann_file=str(path.resolve()), ann_type="pseudo", prepare=None), overwrite=True
    )


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / "eval" / "metrics.json").is_file() and (stage_dir / "model_final.pth").is_file()


def stage_row(stage: str, metrics: dict[str, Any], time_s: float | None = None) -> dict[str, Any]:
    """One ablation row from a stage's ``metrics.json``: novel / base / all AP50 and AP for the OV-COCO
    metric; box APr / APc / APf / AP and mask APr / AP for the LVIS one (box metrics under ``bbox``).
    ``time_s``: the stage's training + evaluation time in this run (None when it finished earlier)."""
    if isinstance(metrics.get("bbox"), dict):
        segm = metrics.get("segm") or {}
        row = {k: metrics["bbox"].get(k) for k in LVIS_BOX_KEYS} | {f"mask_{k}": segm.get(k) for k in LVIS_MASK_KEYS}
    else:
        row = {k: metrics.get(k) for k in METRIC_KEYS}
    return {"stage": stage, **row, "time_s": None if time_s is None else round(time_s, 1)}


def format_ablation(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows (LVIS columns when the first row has ``APr``) with each stage's time."""

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    keys = LVIS_KEYS if rows and "APr" in rows[0] else METRIC_KEYS
    lines = [
        "| stage | " + " | ".join(k.replace("_", " ") for k in keys) + " | time (s) |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for r in rows:
        time_s = "skipped" if r.get("time_s") is None else f"{r['time_s']:.0f}"
        lines.append(f"| {r['stage']} | " + " | ".join(fmt(r.get(k)) for k in keys) + f" | {time_s} |")
    return "\n".join(lines)


def _all_custom_datasets(stages: list[StageCfg], configs: list[Config]) -> list[CustomDatasetCfg]:
    """The ``data.custom`` entries of every stage, each name once.

    Raises:
        OVDError: two stages declare one name with different settings.
    """
    seen: dict[str, tuple[str, CustomDatasetCfg]] = {}
    for stage, cfg in zip(stages, configs, strict=True):
        for spec in cfg.data.custom:
            first = seen.setdefault(spec.name, (stage.name, spec))
            if first[1] != spec:
                raise OVDError(
                    f"dataset {spec.name!r} is declared differently in stages {first[0]!r} and {stage.name!r}",
                    field=f"{stage.name}.data.custom",
                )
    return [spec for _, spec in seen.values()]


def _stage_process(
    cfg: Config,
    stage_dir: Path,
    pipe: PipelineCfg,
    output_dir: Path,
    threads: int,
    custom: list[CustomDatasetCfg],
) -> None:
    """Entry point of a stage trained in its own (spawned) process."""
    import torch

    from ovd.engine.trainer import train
    from ovd.utils.cli import setup_logging

    setup_logging()
    register_custom_datasets(custom)  # catalog entries live in the parent's memory only
    register_pseudo_dataset(pipe, output_dir)
    if cfg.num_threads <= 0:  # "all cores" would oversubscribe the CPUs shared with sibling stages
        torch.set_num_threads(threads)
    train(cfg, stage_dir, resume=True)


def _dependencies(pipe: PipelineCfg, cfg: Config, needs_regions: bool) -> set[str]:
    """Stages that must be finished before this one starts: its init stage and, when it reads the
    region store or pseudo labels, the stage that proposes the regions."""
    deps = {cfg.init_stage} if cfg.init_stage else set()
    stage = _proposal_stage(pipe)
    if needs_regions and stage:
        deps.add(stage)
    return deps


def _wait_for_exits(running: dict[str, tuple[Any, float]]) -> list[tuple[str, Any, float]]:
    """Block until at least one stage process ends; remove the ended ones from ``running`` and return them
    as ``(stage, process, start time)``, joined. A ready sentinel means the process is ending but maybe not
    yet reaped (its ``exitcode`` can still be ``None``), so ended processes are told by their sentinels."""
    done = multiprocessing.connection.wait([proc.sentinel for proc, _ in running.values()])
    ended = []
    for n, (proc, t0) in list(running.items()):
        if proc.sentinel in done:
            proc.join()
            del running[n]
            ended.append((n, proc, t0))
    return ended


@holds_output_lock
def run_pipeline(
    pipeline_file: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    overrides: list[str] | None = None,
    *,
    parallel_stages: int | None = None,
    rerun_changed: bool = False,
    smoke: int = 0,
    preflight_only: bool = False,
) -> dict[str, Any]:
    """Run every stage of a pipeline file; returns ``{"stages": [rows], "prepare_time_s": {step: s},
    "demo": path, "wall_time_s": t}`` (rows: :func:`stage_row`, in the file's order; ``prepare_time_s``:
    data, teacher, regions and pseudo labels as spent in this run, near 0 where already done).

    Stages start in the file's order as soon as the stages they depend on (``init_stage``, and the
    region proposer for stages that read regions or pseudo labels) are finished, up to
    ``parallel_stages`` at once; the shared region store and pseudo labels are made in this process
    before the first stage that reads them starts. With ``parallel_stages: 1`` every stage trains in
    this process. The ``parallel_stages`` argument, when given, replaces the file's value. The output
    folder is locked; ``rerun_changed``: see :func:`ovd.engine.fingerprint.check_reuse`.

    A pre-flight check (:mod:`ovd.preflight`) of every input comes first; ``preflight_only`` returns
    ``{"preflight": report}`` after it. ``smoke``: images per dataset of a smoke run (:mod:`ovd.smoke`;
    0 = a real run); its catalog entries are restored at the end.

    Raises:
        OVDError: a bad pipeline file, an ``init_stage`` that is not a stage, a dependency cycle, a stage
            folder made with other settings, another run in ``output_dir``, or a stage process that
            failed (after the other running stages finish; a rerun resumes them),
            :class:`ovd.preflight.PreflightError` listing every problem the pre-flight check found.
    """
    with contextlib.ExitStack() as cleanup:
        return _run_pipeline(
            pipeline_file, output_dir, overrides, cleanup, parallel_stages=parallel_stages, smoke=smoke,
            preflight_only=preflight_only, rerun_changed=rerun_changed,
        )  # fmt: skip


def _run_pipeline(
    pipeline_file: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    overrides: list[str] | None,
    cleanup: contextlib.ExitStack,
    *,
    parallel_stages: int | None,
    smoke: int,
    preflight_only: bool,
    rerun_changed: bool,
) -> dict[str, Any]:
    from ovd.engine import fingerprint, trainer

    start = time.perf_counter()
    pipeline_file = Path(pipeline_file)
    out = Path(output_dir)
    pipe = load_pipeline(pipeline_file)
    if parallel_stages is not None:
        check_parallel_stages(parallel_stages)
        pipe = replace(pipe, parallel_stages=parallel_stages)
    if smoke:  # every stage, a few images and iterations, in this process (the subsets live in its catalog)
        overrides = [*smoke_overrides(), *(overrides or [])]
        p = pipe.pseudo_labels
        pipe = replace(
            pipe, parallel_stages=1, pseudo_labels=replace(p, threshold=0.0), demo_images=min(pipe.demo_images, 1)
        )
    first = load_config(pipeline_file.parent / pipe.stages[0].config, [*pipe.stages[0].overrides, *(overrides or [])])
    regions_dataset = pipe.regions.dataset or (
        first.data.sources[0].dataset if first.data.sources else first.data.train
    )
    p = pipe.pseudo_labels
    recipes = [
        (s.name, load_config(pipeline_file.parent / s.config, [*s.overrides, *(overrides or [])])) for s in pipe.stages
    ]
    main_plan, own_plan = plan_stores(p, regions_dataset, recipes, out / "regions")
    own = {p.name: own_plan.path} if own_plan else {}
    configs = [stage_config(pipeline_file, s, out, overrides or [], main_plan.path, own) for s in pipe.stages]
    custom = _all_custom_datasets(list(pipe.stages), configs)
    register_custom_datasets(custom)  # before anything reads the catalog
    register_pseudo_dataset(pipe, out)
    known = {s.name for s in pipe.stages}
    for stage, cfg in zip(pipe.stages, configs, strict=True):
        if cfg.init_stage and cfg.init_stage not in known:
            raise OVDError(
                f"init_stage {cfg.init_stage!r} is not a stage of this pipeline", field=f"{stage.name}.init_stage"
            )
    prep_times: dict[str, float] = {}  # seconds spent in this run on what the stages share
    t = time.perf_counter()
    summary: dict[str, dict[str, Any]] = {"caption_tags": {}, "region_stores": {}, "pseudo_labels": {}}
    read = {d for c in configs for d in _stage_datasets(c)} | set(main_plan.datasets) | {p.dataset}
    if smoke:
        from ovd.smoke import register_subsets

        cleanup.enter_context(register_subsets(sorted(read - {p.name, ""}), out / "smoke" / "data", smoke))
    proposer = _proposal_stage(pipe)
    proposals = out / proposer / "model_final.pth" if proposer else Path(pipe.regions.proposals)
    regions = any(c.model.distill.enabled or _reads_pseudo_labels(pipe, c) for c in configs)
    plans = [main_plan, *([own_plan] if own_plan else [])] if regions else []
    report = check_pipeline(configs, out, read, [(s.path, s.datasets) for s in plans], proposals if regions else None,
                            k=pipe.regions.k, skip={p.name}, teacher=pipe.teacher)  # fmt: skip
    if preflight_only:
        return {"preflight": report}
    for name in sorted(read - {p.name, ""}):
        info = get_dataset(name)  # generates the built-in synthetic data on first use
        if makes_caption_tags(info) and info.prepare is None:  # before training: the tags step of the recipe
            summary["caption_tags"][str(info.ann_file_path)] = ensure_caption_tags(info)
    prep_times["data"] = round(time.perf_counter() - t, 1)
    if pipe.teacher:
        from ovd.clip.teacher import ensure_teacher

        t = time.perf_counter()
        ensure_teacher()
        prep_times["teacher"] = round(time.perf_counter() - t, 1)

    def prepare(cfg: Config) -> None:
        """The region store and pseudo labels ``cfg`` reads (made once, by the first stage needing them),
        computed with the stage's thread count and seed, whatever ran in this process before: float
        sums (hence near-tied pseudo boxes) depend on the threads, a random-init CLIP on the seed."""
        import torch

        threads = torch.get_num_threads()
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                _prepare(cfg)
        finally:
            torch.set_num_threads(threads)

    def ensure(plan: StorePlan, cfg: Config, key: str) -> Path:
        """Check or extract a store once per run; every store is listed in the run summary."""
        if str(plan.path) not in summary["region_stores"]:
            t = time.perf_counter()
            status = ensure_store(plan, pipe.regions, cfg, proposals)
            spent = round(time.perf_counter() - t, 1)
            prep_times.setdefault(key, spent)
            summary["region_stores"][str(plan.path)] = {"datasets": list(plan.datasets), "status": status}
        return plan.path

    def _prepare(cfg: Config) -> None:
        pseudo = _reads_pseudo_labels(pipe, cfg)
        if cfg.model.distill.enabled or pseudo:
            store = ensure(main_plan, cfg, "regions")
        if pseudo and own_plan is not None:  # regions of the labelled images themselves
            store = ensure(own_plan, cfg, "pseudo_regions")
        path = pseudo_labels_path(out, p.name)
        if pseudo and str(path) not in summary["pseudo_labels"]:
            t = time.perf_counter()
            summary["pseudo_labels"][str(path)] = ensure_pseudo_labels(p, cfg, store, path, out / "pseudo_labels")
            prep_times.setdefault("pseudo_labels", round(time.perf_counter() - t, 1))

    def needs_regions(cfg: Config) -> bool:
        return cfg.model.distill.enabled or _reads_pseudo_labels(pipe, cfg)

    names = [s.name for s in pipe.stages]
    fingerprint.check_reuse([out / n for n in names], configs, rerun_changed=rerun_changed)
    deps = {s.name: _dependencies(pipe, c, needs_regions(c)) for s, c in zip(pipe.stages, configs, strict=True)}
    times: dict[str, float | None] = {n: None for n in names}
    pending = [n for n in names if not is_finished(out / n)]
    for n in names:
        if n not in pending:
            logger.info("stage %s: finished earlier, skipped", n)
    running: dict[str, tuple[Any, float]] = {}  # stage -> (process, start time)
    failed: list[str] = []
    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads and loader state
    threads = max(1, (os.cpu_count() or 1) // pipe.parallel_stages)
    while pending or running:
        ready = [] if failed else [n for n in pending if all(is_finished(out / d) for d in deps[n])]
        for n in ready[: pipe.parallel_stages - len(running)]:
            i = names.index(n)
            pending.remove(n)
            prepare(configs[i])
            logger.info("stage %s: training %s", n, pipe.stages[i].config)
            t0 = time.perf_counter()
            if pipe.parallel_stages == 1:
                trainer.train(configs[i], out / n, resume=True)
                times[n] = time.perf_counter() - t0
                break  # re-evaluate what is ready
            args = (configs[i], out / n, pipe, out, threads, custom)
            proc = ctx.Process(target=_stage_process, args=args, name=f"stage-{n}")
            proc.start()
            running[n] = (proc, t0)
        if not running:
            if pending and not ready:
                if failed:
                    break
                raise OVDError(
                    f"stages {', '.join(pending)} wait for stages that never finish (a dependency cycle?)",
                    field="stages",
                )
            continue
        for n, proc, t0 in _wait_for_exits(running):
            times[n] = time.perf_counter() - t0
            if proc.exitcode != 0 or not is_finished(out / n):
                failed.append(n)
                logger.error("stage %s failed (exit code %s)", n, proc.exitcode)
    if failed:
        raise OVDError(
            f"stage(s) {', '.join(failed)} failed (see the log above); finished stages are kept, and the same "
            "command resumes the rest",
            path=out,
        )
    from ovd.utils.io import read_json

    rows = [stage_row(n, read_json(out / n / "eval" / "metrics.json"), times[n]) for n in names]
    result: dict[str, Any] = {"stages": rows, "prepare_time_s": prep_times, **summary}
    if pipe.demo_images > 0:
        result["demo"] = str(_demo(configs[-1], out / pipe.stages[-1].name, out / "demo", pipe))
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_json(out / "ablation.json", result)
    return result


def _demo(cfg: Config, stage_dir: Path, demo_dir: Path, pipe: PipelineCfg) -> Path:
    """Run the demo of the final model on the first validation images."""
    from ovd.data.coco import load_dataset
    from ovd.demo import run_demo
    from ovd.predictor import Predictor

    info = get_dataset(cfg.data.test)
    records = load_dataset(info)[: pipe.demo_images]
    inputs = demo_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for r in records:
        link = inputs / Path(r.file_name).name
        if not link.exists():
            link.symlink_to(Path(r.file_name).resolve())
    predictor = Predictor(stage_dir / "model_final.pth", confidence=pipe.demo_confidence)
    run_demo(predictor, inputs, demo_dir, progress=False)
    return demo_dir
