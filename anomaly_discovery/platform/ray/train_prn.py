"""Distributed PRN detector training on Ray Train (issue 5 item 1), behind ``adisc train --model prn``.

A ``TorchTrainer`` runs :func:`prn_train_loop` on every worker: the plain ``PRNDetector.fit`` with Ray's pieces
injected through :class:`~anomaly_discovery.models.prn_training.PRNTrainHooks` — ``prepare_model`` wraps the
head (DDP over gloo on CPU, NCCL on GPU), each worker trains on its share of every epoch's normal images
(``batch_size`` is per worker) with its own generated anomalies, and after every epoch
``ray.train.report(metrics, checkpoint)`` carries rank 0's head, optimizer state and loss history. Every worker
encodes all normal images and fits the same seeded k-means prototypes (methods §3 step 2).

Data, as ``adisc detect --detector prn``: the normal training images and ≤ ``max_real_anomalies`` real anomalies
picked among the test images by ``select_real_anomalies`` (seeded); the driver reads them once, resized to the
training size, into Ray's object store.

Fault tolerance: a run that loses a worker is restarted (``FailureConfig(max_failures)``) and every worker resumes
after the epoch of ``ray.train.get_checkpoint()``; the normal images keep the order of an uninterrupted run, the
generated anomalies after the restart differ. Relaunching with the same ``--name`` and ``--storage`` resumes too.

Artifact: rank 0 saves the detector with ``PRNDetector.save`` into the final checkpoint; the driver copies it to
``<out>/prn.safetensors``, which ``adisc detect --detector prn --prn-model`` loads.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from tqdm.auto import tqdm

from anomaly_discovery.config import load_config
from anomaly_discovery.data import load_image, load_mask, read_dataset
from anomaly_discovery.models.detectors.prn import CheckpointError, PRNConfig, PRNDetector
from anomaly_discovery.models.detectors.prn_training import (PRNTrainHooks, resize_image, resize_mask,
                                                             select_real_anomalies)
from anomaly_discovery.platform.jobs.detect import split_for_detector

from .cluster import (FINAL_CHECKPOINT, ClusterConfig, EpochEvent, build_trainer, cluster_from_args, connect,
                      fit_to_folder, report_epoch, scalar_metrics, worker_scratch)


PRN_MODEL_FILE = "prn.safetensors"
STATE_FILE = "prn_state.pt"


@dataclass
class PRNTrainJob:
    """What to train on and where the detector goes: ``<out>/prn.safetensors``, Ray runs under ``<out>/ray``."""
    data: Path
    out: Path
    prn: PRNConfig
    format: str = "auto"
    progress: bool = True


@dataclass
class PRNWorkerPlan:
    """The picklable brief every worker gets: PRN settings, the object ref of (normal images, real anomalies)
    and per-epoch callbacks (``callback(EpochEvent)``, e.g. a fault drill)."""
    prn: PRNConfig
    images: Any
    epoch_callbacks: tuple[Callable[[EpochEvent], None], ...] = ()


def load_prn_images(job: PRNTrainJob) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The normal training images and the real anomalies (image, mask) ``adisc detect`` would fit PRN on,
    resized to ``image_size`` (what fit does first, so the workers get the same pixels)."""
    size = job.prn.image_size
    fit_samples, test_samples = split_for_detector(read_dataset(job.data, job.format).samples, "prn")
    chosen, _ = select_real_anomalies(test_samples, n=job.prn.max_real_anomalies, seed=job.prn.seed)
    normals = [resize_image(load_image(s.image_path), size)
               for s in tqdm(fit_samples, desc="loading normal images", disable=not job.progress)]
    anomalies = [(resize_image(load_image(s.image_path), size), resize_mask(load_mask(s.mask_path), size))
                 for s in chosen]
    return normals, anomalies


def load_state(path: Path) -> dict:
    """An epoch checkpoint's training state (``weights_only=True``); a damaged one is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a missing or damaged file
        raise CheckpointError(f"PRN checkpoint {path} is missing or unreadable ({exc})") from exc


def prn_train_loop(loop_config: dict) -> None:
    """The per-worker function of the TorchTrainer: resume, fit with Ray's hooks, rank 0 saves the detector."""
    plan: PRNWorkerPlan = loop_config["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if (Path(folder) / PRN_MODEL_FILE).is_file():
                return
            state = load_state(Path(folder) / STATE_FILE)
    resumed_from = len(state["history"]) - 1 if state is not None else None
    local = worker_scratch("adisc-train-prn", loop_config["scratch_key"], rank)
    try:
        def report(epoch: int, metrics: dict, epoch_state: dict) -> None:
            folder = local / f"epoch_{epoch:04d}" if rank == 0 else None
            if folder is not None:
                folder.mkdir()
                torch.save(epoch_state, folder / STATE_FILE)
            values = scalar_metrics(metrics) | {"epoch": epoch, "epochs_done": epoch + 1}
            report_epoch(values, folder)
            for callback in plan.epoch_callbacks:
                callback(EpochEvent(rank, world, epoch, values, resumed_from))
            if folder is not None:
                shutil.rmtree(folder)

        hooks = PRNTrainHooks(wrap_model=ray.train.torch.prepare_model, on_epoch=report, rank=rank,
                              world_size=world, initial_state=state)
        normals, anomalies = ray.get(plan.images)
        config = replace(plan.prn, device=str(ray.train.torch.get_device()), progress=False)
        detector = PRNDetector(config).fit(normals, anomalies, hooks=hooks)
        out = None
        if rank == 0:
            out = local / FINAL_CHECKPOINT
            detector.config = replace(detector.config, device=plan.prn.device, progress=plan.prn.progress)
            detector.save(out / PRN_MODEL_FILE)
        report_epoch({"loss": detector.loss_history_[-1], "epochs_done": config.epochs}, out, FINAL_CHECKPOINT)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@dataclass
class PRNTrainRun:
    """What ``run_prn_train`` returns: the saved detector, the final metrics and the Ray run's folder."""
    model: Path
    metrics: dict
    run_path: str
    seconds: float

    def describe(self) -> str:
        return "\n".join([f"trained PRN on Ray: {self.metrics.get('epochs_done')} epochs, final loss "
                          f"{self.metrics.get('loss', float('nan')):.4f}",
                          f"Ray run (checkpoints): {self.run_path}",
                          f"detector written to {self.model} in {self.seconds:.1f}s "
                          f"(use it with `adisc detect --detector prn --prn-model {self.model}`)"])


def run_prn_train(job: PRNTrainJob, cluster: ClusterConfig,
                  epoch_callbacks: Sequence[Callable[[EpochEvent], None]] = ()) -> PRNTrainRun:
    """Fit PRN on Ray with ``cluster.workers`` workers and save it to ``<job.out>/prn.safetensors``;
    checkpoints live in ``<storage>/<name>``."""
    started = time.perf_counter()
    images = load_prn_images(job)
    connect(cluster.address)
    plan = PRNWorkerPlan(job.prn, ray.put(images), tuple(epoch_callbacks))
    name = cluster.name or f"adisc-train-prn-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = cluster.storage_path(Path(job.out) / "ray")
    result = fit_to_folder(build_trainer(prn_train_loop, plan, cluster, storage, name), name, storage,
                           Path(job.out), "detector")
    return PRNTrainRun(Path(job.out) / PRN_MODEL_FILE, dict(result.metrics), f"{storage}/{name}",
                       time.perf_counter() - started)


def add_prn_arguments(parser) -> None:
    """``adisc train --model prn`` and the PRN settings it reads."""
    parser.add_argument("--model", default="discovery", choices=["discovery", "prn"],
                        help="what to train: the discovery model (default) or the PRN detector (then --config is "
                             "a PRN settings file and --detections, --detector, --base, --k are unused)")
    parser.add_argument("--backbone", default=None, help="--model prn: frozen encoder (default: the settings')")
    parser.add_argument("--image-size", type=int, default=None, help="--model prn: training size in pixels")


def prn_settings(args) -> PRNConfig:
    """PRNConfig from ``--config`` (YAML/JSON), then ``--backbone``, ``--image-size``, ``--epochs``, ``--seed``."""
    settings = load_config(PRNConfig, args.config) if args.config else PRNConfig()
    given = {"encoder": args.backbone, "image_size": args.image_size, "epochs": args.epochs}
    overrides = {key: value for key, value in given.items() if value is not None}
    if overrides.get("encoder") not in (None, settings.encoder):
        overrides["layers"] = None
    return replace(settings, **overrides, seed=args.seed,
                   device="cpu" if args.gpus_per_worker == 0 else "auto", progress=not args.quiet)


def run_prn_train_cli(args) -> int:
    """``adisc train --model prn``: settings, data, cluster options → ``<out>/prn.safetensors``."""
    job = PRNTrainJob(data=args.data, out=args.out, prn=prn_settings(args), format=args.format,
                      progress=not args.quiet)
    print(run_prn_train(job, cluster_from_args(args)).describe())
    return 0
