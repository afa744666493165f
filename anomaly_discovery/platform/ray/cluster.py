"""What every Ray run of the platform shares (issue 5): where and how wide it runs (:class:`ClusterConfig`),
joining or starting the cluster, the TorchTrainer of one run, the per-epoch report, worker scratch folders, and
turning a failed run's worker error back into the error a user can act on."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from anomaly_discovery.models.discovery.checkpoints import CheckpointError

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
    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)


@dataclass(frozen=True)
class EpochEvent:
    """What an epoch callback sees on each worker, after that epoch's report."""
    rank: int
    world_size: int
    epoch: int
    metrics: dict
    resumed_from: Optional[int]


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


def report_epoch(metrics: dict, checkpoint_dir: Optional[Path], name: Optional[str] = None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=checkpoint,
                     checkpoint_dir_name=(name or checkpoint_dir.name) if checkpoint is not None else None)


def build_trainer(train_loop: Callable[[dict], None], plan: Any, cluster: ClusterConfig, storage: str, name: str,
                  callbacks: Sequence = (), overrides: Optional[dict] = None,
                  sample: Optional[dict] = None) -> TorchTrainer:
    """The TorchTrainer of one run of ``train_loop`` (``train.discovery_train_loop``, ``train_prn.prn_train_loop``):
    ``plan`` the workers' brief or its object ref, ``callbacks`` Ray Train user callbacks (e.g.
    TuneReportCallback), ``overrides`` DiscoveryConfig fields or ``sample`` a Tune trial's sample."""
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


def worker_cause(error: Exception) -> Optional[Exception]:
    """A worker's CheckpointError or ValueError inside Ray's TrainingFailedError (None when there is none)."""
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


def cluster_from_args(args) -> ClusterConfig:
    return ClusterConfig(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                         cpus_per_worker=args.cpus_per_worker, address=args.address, storage=args.storage,
                         name=args.name, num_to_keep=args.num_to_keep, max_failures=args.max_failures)
