import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from anomaly_discovery.models.discovery.training import train_discovery
from anomaly_discovery.models.discovery.checkpoints import CheckpointError, latest_checkpoint
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.models.discovery.selection import selection_score
from anomaly_discovery.platform.jobs.discover import DiscoverJobConfig
from anomaly_discovery.platform.jobs.evaluate import evaluate_output
from anomaly_discovery.platform.ray.cluster import (ClusterConfig, EpochEvent, scratch_key, worker_cause,
                                                    worker_scratch)
from anomaly_discovery.platform.ray.train import (add_train_arguments, load_train_data, restore_checkpoint, run_train,
                                                  run_train_cli)
from tests.platform.ray_cluster import ray_session  # noqa: F401  (the session's Ray)
from tests.platform.ray_cluster import TINY_SETTINGS, coloured_regions, images_of, write_detect_output

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])
FILE_SETTINGS = {k: v for k, v in TINY_SETTINGS.items() if k not in ("k", "progress")}


@dataclasses.dataclass(frozen=True)
class KillWorkerOnce:
    """Fault drill: SIGKILL the worker of ``rank`` after epoch ``epoch``'s report while ``marker`` exists (the
    marker is removed first, so the restarted attempt runs through). Ray's controller registers a reported
    checkpoint when it next polls the workers (every 2 s), so the drill waits ``delay_s`` first."""

    marker: str
    rank: int = 1
    epoch: int = 1
    delay_s: float = 3.0

    def __call__(self, event: EpochEvent) -> None:
        if event.rank == self.rank and event.epoch == self.epoch and os.path.exists(self.marker):
            os.remove(self.marker)
            time.sleep(self.delay_s)
            os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class RecordEpochs:
    """Append (rank, epoch, resumed_from) of every report to a JSON-lines file."""

    path: str

    def __call__(self, event: EpochEvent) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps([event.rank, event.epoch, event.resumed_from]) + "\n")


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coloured")
    return folder, write_detect_output(folder, n_per_kind=8, seed=3)


@pytest.fixture(scope="module")
def settings_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "discovery.json"
    path.write_text(json.dumps(FILE_SETTINGS))
    return path


def job(detections, out, epochs=2) -> DiscoverJobConfig:
    folder, _ = detections
    return DiscoverJobConfig(data=folder / "data", out=out, format="folder", detections=folder, k="auto",
                             discovery=DiscoveryConfig.of(**(TINY_SETTINGS | {"epochs": epochs})), device="cpu",
                             progress=False)


def nmi_of(out: Path, kinds: dict[str, int]) -> float:
    images = json.loads((out / "summary.json").read_text())["images"]
    return clustering_report(np.array([kinds[r["id"]] for r in images]),
                             np.array([int(r["class"].split("_")[1]) for r in images]))["nmi"]


@pytest.fixture(scope="module")
def two_worker_cli_run(ray_session, detections, settings_file, tmp_path_factory):
    folder, _ = detections
    out = tmp_path_factory.mktemp("cli") / "train"
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", str(folder / "data"), "--format", "folder", "--detections", str(folder),
                              "--config", str(settings_file), "--k", "auto", "--out", str(out), "--workers", "2",
                              "--cpus-per-worker", "0.5", "--num-to-keep", "1", "--name", "cli", "--quiet"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_train_cli(args) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def killed_one_worker_run(ray_session, detections, tmp_path_factory):
    """A 1-worker run whose only worker is SIGKILLed right after epoch 1's checkpoint (first attempt only)."""
    folder = tmp_path_factory.mktemp("one")
    marker, events = folder / "kill-once", folder / "events.jsonl"
    marker.touch()
    run = run_train(job(detections, folder / "train", epochs=3),
                    ClusterConfig(workers=1, cpus_per_worker=1, max_failures=1, name="one"),
                    epoch_callbacks=[RecordEpochs(str(events)), KillWorkerOnce(str(marker), rank=0, epoch=1)])
    return run, marker, [tuple(json.loads(line)) for line in events.read_text().splitlines()]


def test_cli_train_with_two_workers_writes_what_discover_writes(two_worker_cli_run, detections):
    out, printed = two_worker_cli_run
    assert "trained on Ray" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "discover" and summary["config"]["out"] == str(out)
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert len(summary["images"]) == len(detections[1]) and (out / "assignments.csv").is_file()
    saved = DiscoveryPredictor.load(out / "model").config
    assert saved.model.kind == "learned" and saved.model.view_size == FILE_SETTINGS["view_size"]
    report = evaluate_output(out)
    assert report.kind == "discover" and report.n_images == 24


def test_two_worker_run_keeps_only_num_to_keep_checkpoints(two_worker_cli_run):
    run_folder = two_worker_cli_run[0] / "ray" / "cli"
    kept = sorted(p.name for p in run_folder.iterdir() if p.name.startswith(("epoch_", "final")))
    assert kept == ["final"]


def test_a_killed_worker_restarts_from_the_latest_checkpoint_and_finishes(killed_one_worker_run):
    run, marker, reports = killed_one_worker_run
    assert not marker.exists()
    first = [epoch for _, epoch, resumed in reports if resumed is None]
    resumed_from = {resumed for _, _, resumed in reports if resumed is not None}
    assert first == [0, 1] and len(resumed_from) == 1
    start = resumed_from.pop()
    assert start in (0, 1)
    assert [epoch for _, epoch, resumed in reports if resumed is not None] == list(range(start + 1, 3))
    summary = json.loads((run.out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert not list(Path(tempfile.gettempdir()).glob(f"adisc-train-{scratch_key(run.run_path)}-rank*"))


def test_the_resumed_one_worker_run_equals_the_uninterrupted_single_process_path(killed_one_worker_run,
                                                                                  detections):
    run, _, _ = killed_one_worker_run
    folder, kinds = detections
    data = load_train_data(job(detections, folder / "unused"))
    artifacts = train_discovery(DiscoveryConfig.of(**(TINY_SETTINGS | {"epochs": 3})), data.novel,
                                images=data.image_paths)
    summary = json.loads((run.out / "summary.json").read_text())
    ray_partition = [r["class"] for r in summary["images"]]
    assert clustering_report(ray_partition, [p.label for p in artifacts.images.values()])["ari"] == pytest.approx(1.0)
    np.testing.assert_allclose([h["total"] for h in summary["history"]], [h["total"] for h in artifacts.history],
                               rtol=1e-6)
    assert run.metrics["selection_score"] == pytest.approx(selection_score(None, run.metrics["probe_silhouette"]))


def test_two_worker_clustering_matches_one_worker_within_seed_noise(two_worker_cli_run, killed_one_worker_run,
                                                                    detections):
    folder, kinds = detections
    data = load_train_data(job(detections, folder / "unused"))
    truth = np.array([kinds[r.image_id] for r in data.novel])
    by_seed = []
    for seed in (0, 1, 2):
        artifacts = train_discovery(DiscoveryConfig.of(**(TINY_SETTINGS | {"seed": seed})), data.novel,
                                    images=data.image_paths)
        by_seed.append(clustering_report(truth, [artifacts.images[r.image_id].label for r in data.novel])["nmi"])
    one, two = nmi_of(killed_one_worker_run[0].out, kinds), nmi_of(two_worker_cli_run[0], kinds)
    assert one > 0.4 and two > 0.4
    for nmi in (one, two):  # each run lies within the single-process seeds' range, widened by .15
        assert min(by_seed) - 0.15 <= nmi <= max(by_seed) + 0.15, (one, two, by_seed)


def _one_epoch_checkpoint(tmp_path):
    """The checkpoint folder of a 1-epoch run on 3 crops per kind."""
    regions, _ = coloured_regions(3, seed=0)
    config = DiscoveryConfig.of(**(TINY_SETTINGS | {"epochs": 1}), checkpoint_dir=str(tmp_path / "run"))
    train_discovery(config, regions, images=images_of(regions))
    return latest_checkpoint(tmp_path / "run")


def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    checkpoint = _one_epoch_checkpoint(tmp_path)
    (checkpoint / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        restore_checkpoint(checkpoint, tmp_path / "restored")
    (checkpoint / "state.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="state.json"):
        restore_checkpoint(checkpoint, tmp_path / "restored")


def test_a_workers_checkpoint_error_is_found_inside_rays_failure(tmp_path):
    from ray.train import WorkerGroupError

    checkpoint = _one_epoch_checkpoint(tmp_path)
    (checkpoint / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError) as raised:
        restore_checkpoint(checkpoint, tmp_path / "restored")
    failure = WorkerGroupError("rank 0 failed", {0: RuntimeError("restore failed")})
    failure.worker_failures[0].__cause__ = raised.value
    assert worker_cause(failure) is raised.value
    assert worker_cause(WorkerGroupError("rank 0 failed", {0: RuntimeError("out of memory")})) is None


def test_cluster_config_picks_nccl_for_gpu_workers_and_refuses_bad_values():
    assert ClusterConfig(workers=2).backend == "gloo"
    gpu = ClusterConfig(workers=4, gpus_per_worker=1, cpus_per_worker=4)
    assert gpu.backend == "nccl" and gpu.resources_per_worker() == {"CPU": 4, "GPU": 1}
    assert ClusterConfig(storage="s3://bucket/runs").storage_path(Path("unused")) == "s3://bucket/runs"
    with pytest.raises(ValueError, match="--workers"):
        ClusterConfig(workers=0)
    with pytest.raises(ValueError, match="--max-failures"):
        ClusterConfig(max_failures=-2)


def test_a_worker_scratch_folder_is_the_same_per_run_and_rank_and_starts_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    key = scratch_key("/storage/run")
    first = worker_scratch("adisc-train", key, 0)
    (first / "left-by-a-killed-attempt").write_text("partial")
    again = worker_scratch("adisc-train", key, 0)
    assert again == first and again.parent == tmp_path and not any(again.iterdir())
    assert worker_scratch("adisc-train", key, 1) != first and scratch_key("/storage/other") != key
