"""Hyper-parameter tuning of discovery with Ray Tune (issue 5 item 2), behind ``adisc tune``.

Ray 2.60's pattern (Train V2): a ``Tuner`` over a *function* trainable, :func:`tune_trial`, that builds and
runs one ``TorchTrainer`` (``platform/ray/train.py``) with ``TuneReportCallback``, which forwards every rank-0
report (per epoch, and the final one) to Tune. ``ASHAScheduler`` stops trials whose score lags at a rung
(``time_attr="epochs_done"``; trials that reach the last epoch are never cut, so they write their artifacts).

The search space and how a trial's sample becomes settings live in :mod:`.search_space`.

Trials are ranked by the label-free ``selection_score`` (train.py: held-out base-crop accuracy and the novel
embeddings' silhouette), never by a label of the images being discovered; only finished trials compete.
Concurrency defaults to what the cluster holds (``max_concurrent_trials``). Outputs in ``--out``:
``best_config.yaml`` (a DiscoveryConfig file: ``adisc discover --config`` and ``adisc train --config`` read
it), ``trials.json`` (every trial's settings, score, epochs and status) and ``best/`` (the best trial's
discover-style output). ``--resume`` continues an interrupted experiment with ``Tuner.restore``.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs
import ray
import ray.tune
import yaml
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.platform.jobs.discover import DiscoverJobConfig

from .cluster import ClusterConfig, add_cluster_arguments, build_trainer, cluster_from_args, connect
from .search_space import search_space, trial_overrides
from .train import (SCORE_METRIC, TrainData, add_data_arguments, discovery_settings, discovery_train_loop,
                    job_from_args, load_train_data, make_plan, record_output_folder)


BEST_CONFIG_FILE = "best_config.yaml"
TRIALS_FILE = "trials.json"
TRIAL_DRIVER_CPUS = 0.01


@dataclass
class TuneSettings:
    """``trials`` samples, at most ``max_concurrent`` at once (None: as many as the cluster holds), ASHA's
    ``grace_period`` (epochs before a trial can be stopped) and ``reduction_factor``; ``name`` is the
    experiment folder in the storage and ``resume`` restores it."""
    trials: int = 8
    max_concurrent: Optional[int] = None
    grace_period: int = 1
    reduction_factor: int = 2
    name: str = "adisc-tune"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"--trials must be at least 1, got {self.trials}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError(f"grace_period must be >= 1 and reduction_factor >= 2, got {self.grace_period} and "
                             f"{self.reduction_factor}")


def max_concurrent_trials(cluster: ClusterConfig, resources: dict[str, float], trials: int) -> int:
    """How many trials fit at once: CPUs (and GPUs) of the cluster over what one trial's workers ask for."""
    fits = [int(resources.get("CPU", 0) // (cluster.workers * cluster.cpus_per_worker + TRIAL_DRIVER_CPUS))]
    if cluster.gpus_per_worker > 0:
        fits.append(int(resources.get("GPU", 0) // (cluster.workers * cluster.gpus_per_worker)))
    return max(1, min(trials, *fits))


def tune_trial(config: dict, plan_ref: Any, cluster: ClusterConfig, storage: str) -> None:
    """One trial: a TorchTrainer over this sample, its reports forwarded to Tune. The plan stays an object
    ref (the workers turn the sample into settings), so the trial process never loads torch or the models.
    The Train run is named by the trial id: a restored trial resumes from its own latest checkpoint."""
    trial_id = ray.tune.get_context().get_trial_id()
    build_trainer(discovery_train_loop, plan_ref, cluster, storage, f"train-{trial_id}", callbacks=[TuneReportCallback()],
                  sample=config).fit()


@dataclass
class TuneOutcome:
    """Best trial's settings and score, every trial's record, and where the outputs are."""
    best_config: DiscoveryConfig
    best_score: float
    trials: list[dict]
    out: Path
    seconds: float

    def describe(self) -> str:
        finished = sum(t["finished"] for t in self.trials)
        return "\n".join([
            f"tuned {len(self.trials)} trials ({finished} ran every epoch, the rest stopped by ASHA or failed)",
            f"best label-free selection score {self.best_score:.3f}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.trials[0]["sample"].items()),
            f"best settings: {self.out / BEST_CONFIG_FILE} (use with adisc discover --config / adisc train --config)",
            f"best model: {self.out / 'best'} in {self.seconds:.1f}s"])


def save_best_config(config: DiscoveryConfig, path: Path) -> Path:
    """Write the settings ``load_config(DiscoveryConfig, path)`` reads back (YAML; tuples as lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
    return path


def _checkpoint(path: str, storage: str):
    if "://" in storage:
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage)
        return Checkpoint(path, filesystem=filesystem)
    return Checkpoint(path)


def root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost error under Ray's wrappers (task, controller, worker group)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = (getattr(error, "cause", None) or getattr(error, "controller_failure", None)
                 or next(iter(getattr(error, "worker_failures", {}).values()), None) or error.__cause__)
        if inner is None:
            break
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _trial_records(grid, base: DiscoveryConfig) -> list[dict]:
    records = []
    for result in grid:
        metrics = result.metrics or {}
        sample = dict(result.config or {})
        settings = base.replace(**trial_overrides(base, sample)).fingerprint()
        records.append({
            "trial": metrics.get("trial_id"), "sample": sample,
            "settings": {k: v for k, v in settings.items() if v != base.fingerprint()[k]},
            "score": metrics.get(SCORE_METRIC), "epochs_done": metrics.get("epochs_done"),
            "finished": "k" in metrics, "checkpoint_path": metrics.get("checkpoint_path"),
            "error": None if result.error is None else root_cause(result.error)})
    finished_first = sorted(records, key=lambda r: (not r["finished"], -(r["score"] or 0.0)))
    return finished_first


def run_tune(job: DiscoverJobConfig, cluster: ClusterConfig, settings: TuneSettings,
             data: Optional[TrainData] = None, init_model: Optional[str] = None) -> TuneOutcome:
    """Tune discovery on Ray and write best_config.yaml, trials.json and best/ to ``job.out`` (every trial
    starts from ``init_model`` when given, as retraining does)."""
    started = time.perf_counter()
    connect(cluster.address)
    out = Path(job.out)
    storage = cluster.storage_path(out / "ray")
    experiment = f"{storage}/{settings.name}"
    data = data or load_train_data(job)
    plan = make_plan(job, data, init_model)
    base = plan.discovery
    trial = functools.partial(tune_trial, plan_ref=ray.put(plan), cluster=cluster,
                              storage=f"{storage}/{settings.name}-runs")
    trainable = tune.with_resources(trial, {"cpu": TRIAL_DRIVER_CPUS})
    if settings.resume:
        if not tune.Tuner.can_restore(experiment):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        epochs = base.optimisation.epochs
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=epochs, grace_period=min(settings.grace_period, epochs),
                                  reduction_factor=settings.reduction_factor, stop_last_trials=False)
        concurrent = settings.max_concurrent or max_concurrent_trials(cluster, ray.cluster_resources(),
                                                                      settings.trials)
        tuner = tune.Tuner(
            trainable, param_space=search_space(base, bool(data.base)),
            tune_config=tune.TuneConfig(metric=SCORE_METRIC, mode="max", scheduler=scheduler,
                                        num_samples=settings.trials, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=settings.name, storage_path=storage, verbose=0))
    grid = tuner.fit()
    trials = _trial_records(grid, base)
    best = trials[0] if trials and trials[0]["finished"] else None
    if best is None:
        errors = "; ".join(sorted({t["error"] for t in trials if t["error"]})) or "no trial ran every epoch"
        raise RuntimeError(f"adisc tune: no trial finished ({errors}); see {experiment}")
    best_config = base.replace(**trial_overrides(base, best["sample"]))
    save_best_config(best_config, out / BEST_CONFIG_FILE)
    (out / TRIALS_FILE).write_text(json.dumps({"metric": SCORE_METRIC, "mode": "max", "scheduler": "ASHA",
                                               "experiment": experiment, "trials": trials},
                                              indent=1, default=str))
    _checkpoint(best["checkpoint_path"], storage).to_directory(str(out / "best"))
    record_output_folder(out / "best")
    return TuneOutcome(best_config, float(best["score"]), trials, out, time.perf_counter() - started)


def add_tune_arguments(parser) -> None:
    add_data_arguments(parser)
    add_cluster_arguments(parser)
    group = parser.add_argument_group("Ray Tune")
    group.add_argument("--trials", type=int, default=8, help="number of sampled settings (default 8)")
    group.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    group.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can stop")
    group.add_argument("--resume", action="store_true", help="restore the experiment --name in --storage")


def run_tune_cli(args) -> int:
    """``adisc tune``: the same data and cluster options as ``adisc train``, plus trials and concurrency."""
    discovery = discovery_settings(args.config, args.epochs)
    settings = TuneSettings(trials=args.trials, max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                            name=args.name or "adisc-tune", resume=args.resume)
    cluster = replace(cluster_from_args(args), name=None)
    outcome = run_tune(job_from_args(args, discovery), cluster, settings)
    print(outcome.describe())
    return 0
