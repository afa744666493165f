"""Distributed discovery training on Ray Train (issue 5 item 1), behind ``adisc train``.

A ``TorchTrainer`` runs :func:`discovery_train_loop` on every worker: the plain ``train_discovery`` loop with
Ray's pieces injected through :class:`TrainHooks` — ``prepare_model`` (DDP over gloo on CPU, NCCL on GPU),
``prepare_data_loader`` (a ``DistributedSampler`` over each epoch's plan, so every worker trains on its share;
``batch_size`` is per worker) and, after every epoch, ``ray.train.report(metrics, checkpoint)`` with the
epoch checkpoint rank 0 wrote (safetensors weights, optimizer state, JSON history).

Fault tolerance: a run that loses a worker is restarted by Ray (``FailureConfig(max_failures)``) and every
worker resumes from ``ray.train.get_checkpoint()``; the discovery loop seeds each epoch by (seed, epoch), so
the resumed run finishes the same epochs it would have. Relaunching with the same ``--name`` and
``--storage`` resumes a stopped run the same way.

Artifacts: after the last epoch rank 0 writes exactly what ``adisc discover`` writes (summary.json,
assignments.csv, model/) into a folder it reports as the run's final checkpoint; the driver copies that
checkpoint to ``--out`` (so it works when rank 0 runs on another node).

Each report also carries the label-free selection score (:mod:`..models.model_selection`): accuracy on held-out
labelled base crops and the silhouette of the novel crops' embeddings under the model's own assignments —
never a label of the images being discovered. Ray Tune ranks trials by it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ray
import ray.train
import ray.train.torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from anomaly_discovery.config import load_config
from anomaly_discovery.data.readers import detect_format
from anomaly_discovery.models.discovery.checkpoints import CHECKPOINT_PREFIX, MODEL_FILE, STATE_FILE, CheckpointError
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.frozen import region_images
from anomaly_discovery.models.discovery.model import DiscoveryModel
from anomaly_discovery.models.discovery.selection import SCORE_METRIC, SelectionProbe
from anomaly_discovery.models.discovery.hooks import TrainHooks
from anomaly_discovery.models.discovery.training import train_discovery
from anomaly_discovery.models.localisation.regions import Region
from anomaly_discovery.platform.jobs.detect import SUMMARY_FILE
from anomaly_discovery.platform.jobs.discover import (DiscoverJobConfig, DiscoverSummary, build_base,
                                                      normal_images_of, parse_k, regions_from_detect_output,
                                                      regions_from_detection, write_outputs)

from .cluster import (FINAL_CHECKPOINT, ClusterConfig, EpochEvent, add_cluster_arguments, build_trainer,
                      cluster_from_args, connect, fit_to_folder, report_epoch, scalar_metrics, worker_scratch)
from .search_space import trial_overrides


@dataclass
class TrainData:
    """Everything the workers train on, read once on the driver."""
    novel: list[Region]
    base: Optional[list[Region]]
    image_paths: dict[str, str]
    base_description: str
    data_format: str
    seconds: dict[str, float]
    normal_images: list[str] = field(default_factory=list)


def load_train_data(job: DiscoverJobConfig) -> TrainData:
    """Novel regions (from ``job.detections`` or a fresh detection) and the base set, as ``adisc discover``."""
    start = time.perf_counter()
    if job.detections is not None:
        novel, paths, detect_config = regions_from_detect_output(job.detections, job.progress)
    else:
        novel, paths, detect_config = regions_from_detection(job)
    data_format = detect_config.get("format", job.format)
    if data_format in (None, "auto"):
        data_format = detect_format(detect_config.get("data", job.data))
    seconds = {"regions": time.perf_counter() - start}
    start = time.perf_counter()
    base, description = build_base(job)
    seconds["base"] = time.perf_counter() - start
    return TrainData(novel, base, paths, description, data_format, seconds, normal_images_of(detect_config))


@dataclass
class WorkerPlan:
    """The picklable brief every worker gets: settings, the regions' object ref, what rank 0 needs to write
    the outputs, an optional model folder to fine-tune from (backbone and projector) and per-epoch
    callbacks (``callback(EpochEvent)``, e.g. a fault drill)."""
    discovery: DiscoveryConfig
    job: DiscoverJobConfig
    regions: Any
    image_paths: dict[str, str]
    base_description: str
    data_format: str
    seconds: dict[str, float]
    init_model: Optional[str] = None
    epoch_callbacks: tuple[Callable[[EpochEvent], None], ...] = ()
    normal_images: tuple[str, ...] = ()


def restore_checkpoint(folder: Path, into: Path) -> Optional[int]:
    """Copy a reported epoch checkpoint into ``into/epoch_NNNN`` and check it loads; returns its epoch, or None
    for a final (artifacts) checkpoint. A corrupt or foreign checkpoint is a CheckpointError naming it."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).is_file():
        return None
    state_path = folder / STATE_FILE
    try:
        epoch = int(json.loads(state_path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder} has no readable {STATE_FILE} ({exc})") from exc
    try:
        with safe_open(str(folder / MODEL_FILE), framework="pt") as handle:
            list(handle.keys())
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"checkpoint weights {folder / MODEL_FILE} are corrupt or unreadable ({exc})") from exc
    target = into / f"{CHECKPOINT_PREFIX}{epoch:04d}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return epoch


RUN_SPECIFIC = ("head.", "prototypes", "mean_", "basis_", "view_scale")


def load_backbone_weights(model: nn.Module, folder: Path | str) -> None:
    """Start from a saved discovery model (its ``model/`` folder): what it learned about pooling and features
    (the transformer's backbone and projector; a view model's AMGA pooling and Region Guidance Factor). The
    prototypes start fresh because the class list changes, and a view model keeps this run's nuisance projection
    and view weights."""
    path = Path(folder) / MODEL_FILE
    try:
        weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith(RUN_SPECIFIC)}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"model weights {path} are corrupt or unreadable ({exc})") from exc
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"model {folder} does not fit these settings ({str(exc).splitlines()[0]}); "
                              "train with the settings in its model.json") from exc
    missing = [k for k in missing if not k.startswith(RUN_SPECIFIC)]
    if missing or unexpected:
        raise CheckpointError(f"model {folder} does not fit these settings (missing {missing[:5]}, unexpected "
                              f"{list(unexpected)[:5]}); train with the settings in its model.json")


def discovery_train_loop(loop_config: dict) -> None:
    """The per-worker function of the TorchTrainer: resume, train with Ray's hooks, rank 0 writes artifacts.

    ``loop_config``: ``plan`` (a :class:`WorkerPlan`, or its object ref) and optional ``overrides``
    (DiscoveryConfig fields) or ``sample`` (a Tune trial's sample, turned into overrides here, so the trial's
    own process never loads the models)."""
    plan = loop_config["plan"]
    plan: WorkerPlan = ray.get(plan) if isinstance(plan, ray.ObjectRef) else plan
    overrides = dict(loop_config.get("overrides") or {})
    if "sample" in loop_config:
        overrides |= trial_overrides(plan.discovery, loop_config["sample"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    novel, base = ray.get(plan.regions)
    local = worker_scratch("adisc-train", loop_config["scratch_key"], rank)
    try:
        resumed_from = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                resumed_from = restore_checkpoint(Path(folder), local / "checkpoints")
            if resumed_from is None:
                return
        discovery = plan.discovery.replace(**overrides)
        discovery = discovery.replace(device=str(ray.train.torch.get_device()), progress=False,
                            checkpoint_dir=str(local / "checkpoints"), resume=resumed_from is not None,
                            keep_checkpoints=1)
        probe = (SelectionProbe.build(discovery, novel, base or [])
                 if rank == 0 and not discovery.model.uses_views else None)
        trained: dict[str, DiscoveryModel] = {}
        n_base_classes = len({r.class_name for r in base or []})

        def probe_metrics(cluster_per_head: Sequence[float]) -> dict:
            scores = probe.score(trained["model"], cluster_per_head, n_base_classes, discovery.classes.k,
                                 discovery.classes.k_max, discovery.runtime.seed)
            return {k: v for k, v in scores.items() if v is not None}

        def wrap_model(model: DiscoveryModel) -> nn.Module:
            trained["model"] = model
            if plan.init_model and resumed_from is None:
                load_backbone_weights(model, plan.init_model)
            unused = discovery.model.guidance == "none" or discovery.model.uses_views
            kwargs = {"find_unused_parameters": True} if unused else None
            return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)

        def report(epoch: int, metrics: dict, saved: Optional[Path]) -> None:
            values = scalar_metrics(metrics) | {"epoch": epoch, "epochs_done": epoch + 1}
            if probe is not None:
                values |= probe_metrics(metrics["cluster_per_head"])
            report_epoch(values, saved if rank == 0 else None)
            for callback in plan.epoch_callbacks:
                callback(EpochEvent(rank, world, epoch, values, resumed_from))

        hooks = TrainHooks(wrap_model=wrap_model, wrap_loader=ray.train.torch.prepare_data_loader, report=report,
                           save_checkpoints=rank == 0)
        artifacts = train_discovery(discovery, novel, base, hooks=hooks,
                                    images=region_images(plan.image_paths, base or []),
                                    normal_images=plan.normal_images)
        final = scalar_metrics(artifacts.metrics) | {"epochs_done": discovery.optimisation.epochs, "k": artifacts.k}
        out = None
        if rank == 0:
            if probe is not None:
                final |= probe_metrics(artifacts.history[-1]["cluster_per_head"] if artifacts.history else [])
            out = local / FINAL_CHECKPOINT
            job = replace(plan.job, out=out, discovery=discovery)
            seconds = plan.seconds | {"train": artifacts.metrics["train_seconds"]}
            write_outputs(DiscoverSummary(job, artifacts, plan.image_paths, list(novel), plan.base_description,
                                          plan.data_format, seconds))
        report_epoch(final, out, FINAL_CHECKPOINT)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@dataclass
class TrainRun:
    """What ``run_train`` returns: the output folder, the final metrics and the Ray run's folder."""
    out: Path
    metrics: dict
    run_path: str
    seconds: float

    def describe(self) -> str:
        summary = json.loads((self.out / SUMMARY_FILE).read_text())
        metrics = summary["metrics"]
        return "\n".join([
            f"trained on Ray: K = {summary['k']}, {len(summary['images'])} images, "
            f"silhouette {metrics.get('silhouette', float('nan')):.3f}, selection score "
            f"{self.metrics.get(SCORE_METRIC, float('nan')):.3f}",
            f"Ray run (checkpoints): {self.run_path}",
            f"written to {self.out} in {self.seconds:.1f}s"])


def make_plan(job: DiscoverJobConfig, data: TrainData, init_model: Optional[str] = None,
              epoch_callbacks: Sequence[Callable[[EpochEvent], None]] = ()) -> WorkerPlan:
    """Put the regions in Ray's object store once and describe the run for the workers."""
    discovery = job.discovery.replace(k=job.k, seed=job.seed)
    return WorkerPlan(discovery, job, ray.put((data.novel, data.base)), data.image_paths, data.base_description,
                      data.data_format, data.seconds, init_model, tuple(epoch_callbacks), tuple(data.normal_images))


def run_train(job: DiscoverJobConfig, cluster: ClusterConfig, data: Optional[TrainData] = None,
              init_model: Optional[str] = None,
              epoch_callbacks: Sequence[Callable[[EpochEvent], None]] = ()) -> TrainRun:
    """Train discovery on Ray with ``cluster.workers`` workers and write ``adisc discover``'s outputs to
    ``job.out``; checkpoints live in ``<storage>/<name>``."""
    started = time.perf_counter()
    connect(cluster.address)
    data = data or load_train_data(job)
    out = Path(job.out)
    name = cluster.name or f"adisc-train-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = cluster.storage_path(out / "ray")
    plan = make_plan(job, data, init_model, epoch_callbacks)
    trainer = build_trainer(discovery_train_loop, plan, cluster, storage, name)
    result = fit_to_folder(trainer, name, storage, out, "artifacts")
    record_output_folder(out)
    return TrainRun(out, dict(result.metrics), f"{storage}/{name}", time.perf_counter() - started)


def record_output_folder(out: Path) -> None:
    """summary.json names the folder it now lives in (rank 0 wrote it elsewhere)."""
    path = out / SUMMARY_FILE
    summary = json.loads(path.read_text())
    summary["config"]["out"] = str(out)
    path.write_text(json.dumps(summary, indent=1))


def discovery_settings(path: Optional[Path], epochs: Optional[int] = None) -> DiscoveryConfig:
    """DiscoveryConfig from a settings file (e.g. Tune's best), ``--epochs`` on top."""
    discovery = load_config(DiscoveryConfig, path) if path else DiscoveryConfig()
    return discovery.replace(epochs=epochs) if epochs is not None else discovery


def add_data_arguments(parser) -> None:
    """The data options of ``adisc discover`` (regions and base set)."""
    parser.add_argument("--data", required=True, type=Path, help="dataset folder")
    parser.add_argument("--format", default="auto", choices=["auto", "mvtec", "mtd", "folder", "neu"])
    parser.add_argument("--detections", type=Path, default=None, help="an `adisc detect` output folder")
    parser.add_argument("--detector", default="patchcore",
                        choices=["patchcore", "zero-shot", "prn", "ensemble", "maps"],
                        help="detector to run first when --detections is not given")
    parser.add_argument("--base", default="none", help="labelled known classes: neu:PATH | synthetic:PATH | none")
    parser.add_argument("--k", default="auto", help="number of novel classes, or auto")
    parser.add_argument("--config", type=Path, default=None, help="discovery settings file (YAML/JSON)")
    parser.add_argument("--epochs", type=int, default=None, help="override the settings' epochs")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars on the driver")


def add_train_arguments(parser) -> None:
    add_data_arguments(parser)
    add_cluster_arguments(parser)


def job_from_args(args, discovery: DiscoveryConfig) -> DiscoverJobConfig:
    return DiscoverJobConfig(data=args.data, out=args.out, format=args.format, detector=args.detector,
                             detections=args.detections, k=parse_k(args.k), base=args.base, discovery=discovery,
                             device="cpu" if args.gpus_per_worker == 0 else "auto", seed=args.seed,
                             progress=not args.quiet)


def run_train_cli(args) -> int:
    """``adisc train``: settings file, data, cluster options → a discover-compatible output folder."""
    discovery = discovery_settings(args.config, args.epochs)
    run = run_train(job_from_args(args, discovery), cluster_from_args(args))
    print(run.describe())
    return 0
