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

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from ..models.model_selection import SCORE_METRIC, SelectionProbe

if TYPE_CHECKING:
    import torch

    from ..models.discovery_config import DiscoveryConfig
    from ..models.discovery_model import DiscoveryModel
    from ..models.regions import Region
    from .discover import DiscoverJobConfig

FINAL_CHECKPOINT = "final"


@dataclass
class ClusterConfig:
    """Where and how wide a Ray run is. ``address``: None starts a local Ray sized to the machine, ``auto``
    joins the running cluster, ``ray://host:port`` connects a client. ``storage``: local folder or a
    shared / cloud URI (s3://, gs://) that every node can reach; ``name`` the run's folder in it."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    address: Optional[str] = None
    storage: Optional[str] = None
    name: Optional[str] = None
    num_to_keep: int = 2
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(f"--gpus-per-worker must be >= 0 and --cpus-per-worker > 0, got "
                             f"{self.gpus_per_worker} and {self.cpus_per_worker}")
        if self.num_to_keep < 1:
            raise ValueError(f"--num-to-keep must be at least 1, got {self.num_to_keep}")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be -1 (retry forever) or >= 0, got {self.max_failures}")

    @property
    def backend(self) -> str:
        """NCCL when the workers hold GPUs, gloo on CPU."""
        return "nccl" if self.gpus_per_worker > 0 else "gloo"

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def storage_path(self, default: Path) -> str:
        """The storage URI as given, or a local folder made absolute (Ray needs absolute paths)."""
        storage = self.storage or str(default)
        return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def connect(address: Optional[str]) -> None:
    """Join (``auto`` / ``ray://``) or start (None) a Ray cluster once per process."""
    import ray

    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)


@dataclass
class TrainData:
    """Everything the workers train on, read once on the driver."""

    novel: list[Region]
    base: Optional[list[Region]]
    image_paths: dict[str, str]
    base_description: str
    data_format: str
    seconds: dict[str, float]


def load_train_data(job: DiscoverJobConfig) -> TrainData:
    """Novel regions (from ``job.detections`` or a fresh detection) and the base set, as ``adisc discover``."""
    from ..data.readers import detect_format
    from .discover import build_base, regions_from_detect_output, regions_from_detection

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
    return TrainData(novel, base, paths, description, data_format, seconds)


@dataclass(frozen=True)
class EpochEvent:
    """What an epoch callback sees on each worker, after that epoch's report."""

    rank: int
    world_size: int
    epoch: int
    metrics: dict
    resumed_from: Optional[int]


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


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict (Ray and Tune want flat scalars)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating)) and v is not None}


def scratch_key(run_path: str) -> str:
    """The key of the run at ``run_path`` (``<storage>/<name>``) for its workers' scratch folders: the same for
    every attempt of the run."""
    return hashlib.sha1(run_path.encode()).hexdigest()[:16]


def worker_scratch(prefix: str, key: str, rank: int) -> Path:
    """This worker's empty scratch folder, at the same path on every attempt of one run: a restarted attempt
    clears what a killed one (SIGKILL, node loss: no ``finally`` ran) left there."""
    folder = Path(tempfile.gettempdir()) / f"{prefix}-{key}-rank{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def restore_checkpoint(folder: Path, into: Path) -> Optional[int]:
    """Copy a reported epoch checkpoint into ``into/epoch_NNNN`` and check it loads; returns its epoch, or None
    for a final (artifacts) checkpoint. A corrupt or foreign checkpoint is a CheckpointError naming it."""
    from safetensors import safe_open

    from ..models.discovery_checkpoints import CHECKPOINT_PREFIX, MODEL_FILE, STATE_FILE, CheckpointError
    from .detect import SUMMARY_FILE

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


def load_backbone_weights(model: DiscoveryModel, folder: Path | str) -> None:
    """Start from a saved discovery model (its ``model/`` folder): backbone and projector weights; the
    prototype heads start fresh because the class list changes."""
    from safetensors.torch import load_file

    from ..models.discovery_checkpoints import MODEL_FILE, CheckpointError

    path = Path(folder) / MODEL_FILE
    try:
        weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"model weights {path} are corrupt or unreadable ({exc})") from exc
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"model {folder} does not fit these settings ({str(exc).splitlines()[0]}); "
                              "train with the settings in its model.json") from exc
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"model {folder} does not fit these settings (missing {missing[:5]}, unexpected "
                              f"{list(unexpected)[:5]}); train with the settings in its model.json")


def _report(metrics: dict, checkpoint_dir: Optional[Path], name: Optional[str] = None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=checkpoint,
                     checkpoint_dir_name=(name or checkpoint_dir.name) if checkpoint is not None else None)


def discovery_train_loop(loop_config: dict) -> None:
    """The per-worker function of the TorchTrainer: resume, train with Ray's hooks, rank 0 writes artifacts.

    ``loop_config``: ``plan`` (a :class:`WorkerPlan`, or its object ref) and optional ``overrides``
    (DiscoveryConfig fields) or ``sample`` (a Tune trial's sample, turned into overrides here, so the trial's
    own process never loads the models)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ..models.discovery import TrainHooks, train_discovery
    from .discover import DiscoverSummary, write_outputs

    plan = loop_config["plan"]
    plan: WorkerPlan = ray.get(plan) if isinstance(plan, ray.ObjectRef) else plan
    overrides = dict(loop_config.get("overrides") or {})
    if "sample" in loop_config:
        from .tune import trial_overrides

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
        discovery = replace(plan.discovery, **overrides)
        discovery = replace(discovery, device=str(ray.train.torch.get_device()), progress=False,
                            checkpoint_dir=str(local / "checkpoints"), resume=resumed_from is not None,
                            keep_checkpoints=1)
        probe = SelectionProbe.build(discovery, novel, base or []) if rank == 0 else None
        trained: dict[str, DiscoveryModel] = {}
        n_base_classes = len({r.class_name for r in base or []})

        def probe_metrics(cluster_per_head: Sequence[float]) -> dict:
            scores = probe.score(trained["model"], cluster_per_head, n_base_classes, discovery.k, discovery.k_max,
                                 discovery.seed)
            return {k: v for k, v in scores.items() if v is not None}

        def wrap_model(model: DiscoveryModel) -> torch.nn.Module:
            trained["model"] = model
            if plan.init_model and resumed_from is None:
                load_backbone_weights(model, plan.init_model)
            kwargs = {"find_unused_parameters": True} if discovery.guidance == "none" else None
            return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)

        def report(epoch: int, metrics: dict, saved: Optional[Path]) -> None:
            values = scalar_metrics(metrics) | {"epoch": epoch, "epochs_done": epoch + 1}
            if probe is not None:
                values |= probe_metrics(metrics["cluster_per_head"])
            _report(values, saved if rank == 0 else None)
            for callback in plan.epoch_callbacks:
                callback(EpochEvent(rank, world, epoch, values, resumed_from))

        hooks = TrainHooks(wrap_model=wrap_model, wrap_loader=ray.train.torch.prepare_data_loader, report=report,
                           save_checkpoints=rank == 0)
        artifacts = train_discovery(discovery, novel, base, hooks=hooks)
        final = scalar_metrics(artifacts.metrics) | {"epochs_done": discovery.epochs, "k": artifacts.k}
        out = None
        if rank == 0:
            final |= probe_metrics(artifacts.history[-1]["cluster_per_head"] if artifacts.history else [])
            out = local / FINAL_CHECKPOINT
            job = replace(plan.job, out=out, discovery=discovery)
            seconds = plan.seconds | {"train": artifacts.metrics["train_seconds"]}
            write_outputs(DiscoverSummary(job, artifacts, plan.image_paths, list(novel), plan.base_description,
                                          plan.data_format, seconds))
        _report(final, out, FINAL_CHECKPOINT)
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
        from .detect import SUMMARY_FILE

        summary = json.loads((self.out / SUMMARY_FILE).read_text())
        metrics = summary["metrics"]
        return "\n".join([
            f"trained on Ray: K = {summary['k']}, {len(summary['images'])} images, "
            f"silhouette {metrics.get('silhouette', float('nan')):.3f}, selection score "
            f"{self.metrics.get(SCORE_METRIC, float('nan')):.3f}",
            f"Ray run (checkpoints): {self.run_path}",
            f"written to {self.out} in {self.seconds:.1f}s"])


def build_trainer(plan: Any, cluster: ClusterConfig, storage: str, name: str, callbacks: Sequence = (),
                  overrides: Optional[dict] = None, sample: Optional[dict] = None,
                  train_loop: Callable[[dict], None] = discovery_train_loop):
    """The TorchTrainer of one discovery run: ``plan`` a WorkerPlan or its object ref, ``callbacks`` Ray Train
    user callbacks (e.g. TuneReportCallback), ``overrides`` DiscoveryConfig fields or ``sample`` a Tune
    trial's sample (see :func:`discovery_train_loop`); ``train_loop`` another per-worker function taking the
    same ``plan`` (the PRN one, ``train_prn.prn_train_loop``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan, "overrides": overrides or {}, "scratch_key": scratch_key(f"{storage}/{name}")}
        | ({"sample": sample} if sample else {}),
        scaling_config=ScalingConfig(num_workers=cluster.workers, use_gpu=cluster.gpus_per_worker > 0,
                                     resources_per_worker=cluster.resources_per_worker()),
        torch_config=TorchConfig(backend=cluster.backend),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                             checkpoint_config=CheckpointConfig(num_to_keep=cluster.num_to_keep),
                             failure_config=FailureConfig(max_failures=cluster.max_failures)))


def make_plan(job: DiscoverJobConfig, data: TrainData, init_model: Optional[str] = None,
              epoch_callbacks: Sequence[Callable[[EpochEvent], None]] = ()) -> WorkerPlan:
    """Put the regions in Ray's object store once and describe the run for the workers."""
    import ray

    discovery = replace(job.discovery, k=job.k, seed=job.seed)
    return WorkerPlan(discovery, job, ray.put((data.novel, data.base)), data.image_paths, data.base_description,
                      data.data_format, data.seconds, init_model, tuple(epoch_callbacks))


def worker_cause(error: Exception) -> Optional[Exception]:
    """A worker's CheckpointError or ValueError inside Ray's TrainingFailedError (None when there is none)."""
    from ..models.discovery_checkpoints import CheckpointError

    for failure in getattr(error, "worker_failures", {}).values():
        cause = failure
        while cause is not None:
            if isinstance(cause, (CheckpointError, ValueError)):
                return cause
            cause = getattr(cause, "cause", None) or cause.__cause__
    return None


def fit_to_folder(trainer: Any, name: str, storage: str, out: Path, what: str) -> Any:
    """Run ``trainer``; a worker's data or checkpoint error comes back as that error kind with the run named, and
    the final checkpoint (``what`` names its content) is copied into ``out``. Returns Ray's ``Result``."""
    from ray.train import TrainingFailedError

    from ..models.discovery_checkpoints import CheckpointError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        cause = worker_cause(exc)
        if cause is None:
            raise
        kind = CheckpointError if isinstance(cause, CheckpointError) else ValueError
        raise kind(f"run {name} in {storage} failed: {str(cause).splitlines()[-1]}") from exc
    if result.checkpoint is None or Path(result.checkpoint.path).name != FINAL_CHECKPOINT:
        raise RuntimeError(f"run {name} ended without its final {what} checkpoint (got {result.checkpoint})")
    out.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(out))
    return result


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
    result = fit_to_folder(build_trainer(plan, cluster, storage, name), name, storage, out, "artifacts")
    record_output_folder(out)
    return TrainRun(out, dict(result.metrics), f"{storage}/{name}", time.perf_counter() - started)


def record_output_folder(out: Path) -> None:
    """summary.json names the folder it now lives in (rank 0 wrote it elsewhere)."""
    from .detect import SUMMARY_FILE

    path = out / SUMMARY_FILE
    summary = json.loads(path.read_text())
    summary["config"]["out"] = str(out)
    path.write_text(json.dumps(summary, indent=1))


def discovery_settings(path: Optional[Path], epochs: Optional[int] = None) -> DiscoveryConfig:
    """DiscoveryConfig from a settings file (e.g. Tune's best), ``--epochs`` on top."""
    from ..config import load_config
    from ..models.discovery_config import DiscoveryConfig

    discovery = load_config(DiscoveryConfig, path) if path else DiscoveryConfig()
    return replace(discovery, epochs=epochs) if epochs is not None else discovery


def add_cluster_arguments(parser) -> None:
    """The Ray options train, tune and retrain share."""
    group = parser.add_argument_group("Ray cluster")
    group.add_argument("--workers", type=int, default=1, help="training workers per run (default 1)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU and gloo)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    group.add_argument("--address", default=None,
                       help="auto (join the running cluster) | ray://HOST:PORT; default: start a local Ray")
    group.add_argument("--storage", default=None,
                       help="run storage: folder or shared/cloud URI (default <out>/ray)")
    group.add_argument("--name", default=None, help="run name in the storage (same name: resume that run)")
    group.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept per run (default 2)")
    group.add_argument("--max-failures", type=int, default=2, help="restarts after a lost worker (default 2)")


def add_data_arguments(parser) -> None:
    """The data options of ``adisc discover`` (regions and base set)."""
    parser.add_argument("--data", required=True, type=Path, help="dataset folder")
    parser.add_argument("--format", default="auto", choices=["auto", "mvtec", "mtd", "folder", "neu"])
    parser.add_argument("--detections", type=Path, default=None, help="an `adisc detect` output folder")
    parser.add_argument("--detector", default="patchcore", choices=["patchcore", "zero-shot", "prn", "maps"],
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


def cluster_from_args(args) -> ClusterConfig:
    return ClusterConfig(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                         cpus_per_worker=args.cpus_per_worker, address=args.address, storage=args.storage,
                         name=args.name, num_to_keep=args.num_to_keep, max_failures=args.max_failures)


def job_from_args(args, discovery: DiscoveryConfig) -> DiscoverJobConfig:
    from .discover import DiscoverJobConfig, parse_k

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
