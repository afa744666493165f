import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from anomaly_discovery.cli import build_parser, main
from anomaly_discovery.data import load_image, read_dataset
from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.models.detectors.prn import DEFAULT_LAYERS, CheckpointError, PRNConfig, PRNDetector
from anomaly_discovery.platform.ray.cluster import ClusterConfig, scratch_key
from anomaly_discovery.platform.ray.train_prn import PRNTrainJob, load_state, prn_settings, run_prn_train
from tests.platform.ray_cluster import ray_session  # noqa: F401  (the session's Ray)
from tests.platform.ray.test_train import KillWorkerOnce, RecordEpochs

pytestmark = pytest.mark.slow
SIZE = 64
EPOCHS = 3
TINY_PRN = dict(encoder="tiny", image_size=SIZE, epochs=EPOCHS, batch_size=4, max_real_anomalies=2, progress=False)


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    """7 normal training images and 13 test images (11 with a defect) of a 64 px metal plate."""
    root = tmp_path_factory.mktemp("gen")
    generate_dataset(root, n_images=40, seed=0, image_size=SIZE, progress=False)
    return root / "metal_plate"


@pytest.fixture(scope="module")
def killed_two_worker_run(ray_session, plates, tmp_path_factory):
    """A 2-worker run whose rank 1 is SIGKILLed right after epoch 1's checkpoint (first attempt only)."""
    folder = tmp_path_factory.mktemp("prn")
    marker, events = folder / "kill-once", folder / "events.jsonl"
    marker.touch()
    job = PRNTrainJob(data=plates, out=folder / "train", prn=PRNConfig(**TINY_PRN), format="mvtec", progress=False)
    cluster = ClusterConfig(workers=2, cpus_per_worker=0.5, num_to_keep=1, max_failures=1, name="prn")
    run = run_prn_train(job, cluster, epoch_callbacks=[RecordEpochs(str(events)),
                                                       KillWorkerOnce(str(marker), rank=1, epoch=1)])
    return run, marker, [tuple(json.loads(line)) for line in events.read_text().splitlines()]


def test_the_trained_detector_loads_and_predicts_maps_at_each_image_size(killed_two_worker_run, plates):
    run, _, _ = killed_two_worker_run
    assert run.model.name == "prn.safetensors" and f"{EPOCHS} epochs" in run.describe()
    detector = PRNDetector.load(run.model, device="cpu")
    assert detector.config.encoder == "tiny" and len(detector.loss_history_) == EPOCHS
    assert detector.n_real_anomalies_ == 2 and detector.sources_ == ("real", "extended", "simulated")
    images = [load_image(s.image_path) for s in read_dataset(plates, "mvtec").samples if s.split == "test"][:3]
    detections = detector.predict(images + [np.zeros((40, 90, 3), np.uint8)])
    assert [d.anomaly_map.shape for d in detections] == [(SIZE, SIZE)] * 3 + [(40, 90)]
    assert all(np.isfinite(d.anomaly_map).all() and 0.0 <= d.score <= 1.0 for d in detections)


def test_a_killed_worker_resumes_both_workers_from_the_latest_checkpoint(killed_two_worker_run):
    run, marker, reports = killed_two_worker_run
    assert not marker.exists()
    for rank in (0, 1):
        assert [epoch for r, epoch, resumed in reports if r == rank and resumed is None] == [0, 1]
    resumed_from = {resumed for _, _, resumed in reports if resumed is not None}
    assert len(resumed_from) == 1
    start = resumed_from.pop()
    assert start in (0, 1)
    for rank in (0, 1):
        resumed_epochs = [epoch for r, epoch, resumed in reports if r == rank and resumed is not None]
        assert resumed_epochs == list(range(start + 1, EPOCHS))
    assert run.metrics["epochs_done"] == EPOCHS
    assert not list(Path(tempfile.gettempdir()).glob(f"adisc-train-prn-{scratch_key(run.run_path)}-rank*"))


def test_the_run_keeps_only_the_final_checkpoint(killed_two_worker_run):
    run_folder = killed_two_worker_run[0].model.parent / "ray" / "prn"
    assert sorted(p.name for p in run_folder.iterdir() if p.name.startswith(("epoch_", "final"))) == ["final"]


def test_detect_uses_the_trained_detector_and_leaves_out_its_real_anomalies(killed_two_worker_run, plates,
                                                                              tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["detect", "--data", str(plates), "--format", "mvtec", "--detector", "prn", "--prn-model",
                     str(killed_two_worker_run[0].model), "--object-prior", "fallback", "--out",
                     str(tmp_path / "detect"), "--device", "cpu", "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "detect" / "summary.json").read_text())
    held_out = set(summary["held_out_for_training"])
    assert len(held_out) == 2 and len(summary["images"]) == 13 - 2
    assert not held_out & {record["image"] for record in summary["images"]}
    first = tmp_path / "detect" / "images" / summary["images"][0]["id"] / "anomaly_map.npy"
    assert np.load(first).shape == (SIZE, SIZE)


def test_detect_refuses_a_prn_model_for_another_detector(plates, tmp_path, capsys):
    code = main(["detect", "--data", str(plates), "--detector", "patchcore", "--prn-model", str(tmp_path / "x"),
                 "--out", str(tmp_path / "detect")])
    assert code == 1 and "--prn-model" in capsys.readouterr().err


def test_train_cli_reads_prn_settings_from_the_file_then_the_flags(tmp_path):
    settings = tmp_path / "prn.yaml"
    settings.write_text("encoder: mobilenet_v2\nbatch_size: 6\nmax_real_anomalies: 3\n")
    args = build_parser("train").parse_args(["train", "--model", "prn", "--data", "d", "--out", "o", "--config",
                                             str(settings), "--backbone", "tiny", "--image-size", "64", "--epochs",
                                             "4", "--seed", "5"])
    config = prn_settings(args)
    assert (config.encoder, config.layers, config.image_size, config.epochs) == ("tiny", DEFAULT_LAYERS["tiny"], 64, 4)
    assert (config.batch_size, config.max_real_anomalies, config.seed, config.device) == (6, 3, 5, "cpu")


def test_train_cli_with_model_prn_refuses_bad_prn_settings_before_starting_ray(plates, tmp_path, capsys):
    settings = tmp_path / "prn.json"
    settings.write_text(json.dumps(TINY_PRN | {"batch_size": 1}))
    code = main(["train", "--model", "prn", "--data", str(plates), "--config", str(settings), "--out",
                 str(tmp_path / "train")])
    assert code == 1 and "batch_size must be ≥ 2" in capsys.readouterr().err


def test_a_damaged_epoch_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "prn_state.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="prn_state.pt"):
        load_state(path)
