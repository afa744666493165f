import argparse
import contextlib
import io
import json

import pytest

from anomaly_discovery.cli import main
from anomaly_discovery.config import load_config
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.platform.ray.cluster import ClusterConfig
from anomaly_discovery.platform.ray.search_space import search_space, trial_overrides
from anomaly_discovery.platform.ray.tune import (BEST_CONFIG_FILE, TRIALS_FILE, add_tune_arguments,
                                                 max_concurrent_trials, root_cause, run_tune_cli)
from tests.platform.ray_cluster import ray_session  # noqa: F401  (the session's Ray)
from tests.platform.ray_cluster import TINY_SETTINGS, write_detect_output

pytestmark = pytest.mark.slow
FILE_SETTINGS = {k: v for k, v in TINY_SETTINGS.items() if k not in ("k", "progress")}


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coloured")
    write_detect_output(folder, n_per_kind=8, seed=3)
    return folder


def tune_args(detections, out, *extra):
    settings = out.parent / "settings.json"
    settings.write_text(json.dumps(FILE_SETTINGS))
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    return parser.parse_args(["--data", str(detections / "data"), "--format", "folder", "--detections",
                              str(detections), "--config", str(settings), "--out", str(out), "--trials", "2",
                              "--workers", "1", "--cpus-per-worker", "0.5", "--epochs", "2", "--quiet", *extra])


@pytest.fixture(scope="module")
def tuned(ray_session, detections, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_tune_cli(tune_args(detections, out)) == 0
    return out, printed.getvalue()


def test_tune_runs_two_asha_trials_and_ranks_them_by_the_label_free_score(tuned):
    out, printed = tuned
    record = json.loads((out / TRIALS_FILE).read_text())
    assert record["metric"] == "selection_score" and record["scheduler"] == "ASHA"
    trials = record["trials"]
    assert len(trials) == 2 and trials[0]["finished"]
    assert trials[0]["score"] == max(t["score"] for t in trials if t["finished"])
    assert set(trials[0]["sample"]) >= {"consistency_lr", "temperature", "consistency_entropy_weight", "neighbours",
                                        "crop_scale_min"}
    assert "best label-free selection score" in printed
    assert json.loads((out / "best" / "summary.json").read_text())["kind"] == "discover"


def test_the_best_config_is_what_adisc_discover_runs_with(tuned, detections, tmp_path):
    out, _ = tuned
    best = load_config(DiscoveryConfig, out / BEST_CONFIG_FILE)
    sample = json.loads((out / TRIALS_FILE).read_text())["trials"][0]["sample"]
    assert best.optimisation.consistency_lr == pytest.approx(sample["consistency_lr"])
    assert best.optimisation.neighbours == sample["neighbours"]
    assert best.optimisation.augment.scale == (pytest.approx(sample["crop_scale_min"]), 1.0)
    code = main(["discover", "--data", str(detections / "data"), "--format", "folder", "--detections",
                 str(detections), "--config", str(out / BEST_CONFIG_FILE), "--out", str(tmp_path / "d"), "--quiet"])
    assert code == 0
    used = json.loads((tmp_path / "d" / "summary.json").read_text())["config"]["discovery"]
    assert used["consistency_lr"] == pytest.approx(best.optimisation.consistency_lr)
    assert used["temperature"] == pytest.approx(best.model.temperature)


def test_resume_restores_the_finished_experiment_without_rerunning(tuned, detections):
    out, _ = tuned
    before = json.loads((out / TRIALS_FILE).read_text())["trials"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_tune_cli(tune_args(detections, out, "--resume")) == 0
    after = json.loads((out / TRIALS_FILE).read_text())["trials"]
    assert [(t["trial"], t["score"]) for t in after] == [(t["trial"], t["score"]) for t in before]


def test_trial_overrides_map_the_search_space_onto_discovery_settings():
    base = DiscoveryConfig.of(**TINY_SETTINGS)
    overrides = trial_overrides(base, {"teacher_temperature_end": 0.03, "crop_scale_min": 0.5,
                                       "overcluster_factor": 1.5, "lr": 0.01, "n_guided_blocks": 1,
                                       "consistency_lr": 0.02, "neighbours": 5})
    assert overrides["teacher_temperature"] == (0.07, 0.03) and overrides["augment"].scale == (0.5, 1.0)
    assert overrides["k_max"] == 6 and overrides["lr"] == 0.01 and overrides["n_guided_blocks"] == 1
    assert overrides["consistency_lr"] == 0.02 and overrides["neighbours"] == 5
    with pytest.raises(ValueError, match="unknown search-space keys"):
        trial_overrides(base, {"momentum": 0.5})


def test_search_space_tunes_the_supervised_weight_only_with_a_base_set():
    pytest.importorskip("ray")
    base = DiscoveryConfig.of(**TINY_SETTINGS)
    assert "supervised_weight" not in search_space(base, has_base_set=False)
    assert "supervised_weight" in search_space(base, has_base_set=True)


def test_the_search_space_follows_the_model_kind():
    pytest.importorskip("ray")
    views = search_space(DiscoveryConfig.of(**TINY_SETTINGS), has_base_set=False)
    transformer = search_space(DiscoveryConfig.of(**TINY_SETTINGS, kind="transformer"), has_base_set=False)
    assert {"consistency_lr", "neighbours"} <= set(views) and "n_guided_blocks" not in views
    assert {"lr", "n_guided_blocks", "teacher_temperature_end"} <= set(transformer) and "neighbours" not in transformer


def test_concurrency_follows_the_cluster_resources():
    cpu = ClusterConfig(workers=2, cpus_per_worker=1)
    assert max_concurrent_trials(cpu, {"CPU": 16}, trials=8) == 7
    assert max_concurrent_trials(cpu, {"CPU": 1}, trials=8) == 1
    gpu = ClusterConfig(workers=2, gpus_per_worker=1, cpus_per_worker=4)
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 4}, trials=8) == 2


def test_a_failed_trial_is_recorded_by_its_innermost_error():
    from ray.train import ControllerError, WorkerGroupError

    assert root_cause(ControllerError(TimeoutError("worker group start timed out\ndetails"))) == \
        "TimeoutError: worker group start timed out"
    assert root_cause(WorkerGroupError("rank 0 failed", {0: ValueError("bad lr")})) == "ValueError: bad lr"
