import argparse
import contextlib
import io
import json

import cv2
import numpy as np
import pytest

from anomaly_discovery.data.errors import DataError
from anomaly_discovery.models.discovery.training import train_discovery
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.platform.jobs.discover import DiscoverJobConfig, regions_from_detect_output
from anomaly_discovery.models.localisation.localise import fit_localisation
from anomaly_discovery.platform.predictor import build_predictor, write_discovery_model
from anomaly_discovery.platform.ray.retrain import (ConfirmedLabel, add_retrain_arguments, apply_labels,
                                                    next_version_folder, read_labels_file, read_store_labels,
                                                    run_retrain_cli)
from anomaly_discovery.platform.storage.store import (NewAssignment, NewImage, NewRegion, Store, add_class, add_images,
                                                      add_model_version, add_regions, get_or_create_dataset,
                                                      get_or_create_product, set_assignments)
from anomaly_discovery.platform.storage.models import AssignmentSource, ClassStatus, ModelVersion
from anomaly_discovery.platform.ray.train import load_train_data
from anomaly_discovery.platform.review.mirror import embeddings_path
from anomaly_discovery.platform.storage.index import read_index_metadata
from anomaly_discovery.platform.storage.paths import ServicePaths
from tests.platform.ray_cluster import ray_session  # noqa: F401  (the session's Ray)
from tests.platform.ray_cluster import KIND_NAMES, TINY_SETTINGS, write_detect_output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coloured")
    return folder, write_detect_output(folder, n_per_kind=8, seed=3)


@pytest.fixture(scope="module")
def summary_images(detections):
    return json.loads((detections[0] / "summary.json").read_text())["images"]


@pytest.fixture(scope="module")
def current_model(detections, tmp_path_factory):
    """The serving folder in service: a tiny PatchCore, the run's localisation and a discovery model trained
    on the detections with nothing confirmed yet (single process)."""
    folder, _ = detections
    regions, paths, _ = regions_from_detect_output(folder, progress=False)
    artifacts = train_discovery(DiscoveryConfig.of(**(TINY_SETTINGS | {"epochs": 1})), regions, images=paths)
    normal = [np.full((64, 64, 3), 120, np.uint8) for _ in range(2)]
    detector = PatchCoreDetector(backbone="tiny", image_size=64, device="cpu", progress=False).fit(normal)
    localisation = fit_localisation([np.zeros((64, 64)), np.ones((64, 64))], [128])
    return write_discovery_model(tmp_path_factory.mktemp("current") / "serving", artifacts.predictor, detector,
                                 localisation, "initial")


@pytest.fixture(scope="module")
def store_url(detections, summary_images, current_model, tmp_path_factory):
    """A review store where reviewers confirmed the red disks of the first five images of that kind (and
    no other class), with the current model as its active version."""
    _, kinds = detections
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'adisc.db'}"
    store = Store(url)
    red = [r for r in summary_images if kinds[r["id"]] == 0][:5]
    with store.session() as session:
        dataset = get_or_create_dataset(session, get_or_create_product(session, "coloured"), "test")
        image_ids = add_images(session, dataset, [NewImage(r["image"], f"hash{i}") for i, r in enumerate(red)])
        region_ids = add_regions(session, [NewRegion(i, tuple(r["regions"][0]["box"]), 1.0)
                                           for i, r in zip(image_ids, red)])
        confirmed = add_class(session, "red_disk", ClassStatus.CONFIRMED)
        proposed = add_class(session, "maybe_blue", ClassStatus.PROPOSED)
        set_assignments(session, [NewAssignment(r, confirmed.id) for r in region_ids[:4]], AssignmentSource.REVIEWER)
        set_assignments(session, [NewAssignment(region_ids[4], proposed.id)], AssignmentSource.MODEL)
        add_model_version(session, "initial", str(current_model))
    store.dispose()
    return url


def retrain_arguments(folder, store_url, out, *extra):
    parser = argparse.ArgumentParser()
    add_retrain_arguments(parser)
    return parser.parse_args(["--data", str(folder / "data"), "--format", "folder", "--detections", str(folder),
                              "--store", store_url, "--out", str(out), "--epochs", "1", "--workers", "1",
                              "--cpus-per-worker", "0.5", "--quiet", *extra])


@pytest.fixture(scope="module")
def service_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def retrained(ray_session, detections, store_url, service_folder, tmp_path_factory):
    folder, _ = detections
    out = tmp_path_factory.mktemp("versions")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_retrain_cli(retrain_arguments(folder, store_url, out, "--activate", "--workdir",
                                                 str(service_folder))) == 0
    return out, printed.getvalue()


def test_activate_without_the_service_folder_is_refused_before_training(detections, store_url, tmp_path):
    folder, _ = detections
    with pytest.raises(ValueError, match="--activate needs --store and --workdir"):
        run_retrain_cli(retrain_arguments(folder, store_url, tmp_path / "out", "--activate"))
    assert not (tmp_path / "out").exists()


def test_retrain_from_the_store_writes_a_new_version_with_the_confirmed_class_as_base(retrained, current_model):
    out, printed = retrained
    version = out / "v0001"
    record = json.loads((version / "version.json").read_text())
    assert record["confirmed_classes"] == {"red_disk": 4} and record["n_novel"] == 20
    assert record["parent_model"] == str(current_model) and "v0001" in printed
    assert DiscoveryPredictor.load(version / "model").base_classes == ["red_disk"]
    assert DiscoveryPredictor.load(version / "serving" / "discovery").base_classes == ["red_disk"]
    assert json.loads((version / "summary.json").read_text())["kind"] == "discover"
    assert next_version_folder(out).name == "v0002"


def test_retrain_registers_and_activates_the_version_in_the_store_and_the_served_index(retrained, store_url,
                                                                                      service_folder):
    out, _ = retrained
    store = Store(store_url)
    with store.session() as session:
        active = session.query(ModelVersion).filter(ModelVersion.is_active.is_(True)).one()
        assert active.artifact_path == str((out / "v0001" / "serving").resolve())
        assert session.query(ModelVersion).count() == 2
    store.dispose()
    index = ServicePaths(service_folder).index
    assert read_index_metadata(index)["model_version"] == active.name
    assert embeddings_path(index, active.name).is_file()
    assert json.loads((out / "v0001" / "version.json").read_text())["reembedded_regions"] == 0


def test_the_new_serving_folder_loads_and_predicts(retrained, detections, summary_images):
    out, _ = retrained
    predictor = build_predictor(out / "v0001" / "serving")
    image = cv2.imread(summary_images[0]["image"])[..., ::-1]
    predicted = predictor.predict([image])
    assert len(predicted) == 1 and predicted[0].regions
    assert all(region.embedding.shape == (predictor.embedding_dim,) for region in predicted[0].regions)


def test_store_labels_are_the_current_assignments_to_confirmed_classes(store_url, current_model):
    labels, active = read_store_labels(store_url)
    assert {label.class_name for label in labels} == {"red_disk"} and len(labels) == 4
    assert all(label.box == (0, 0, 64, 64) for label in labels)


def test_labels_file_rows_name_images_by_id_or_path_with_an_optional_box(tmp_path, detections, summary_images):
    folder, kinds = detections
    blue = [r for r in summary_images if kinds[r["id"]] == 1]
    path = tmp_path / "labels.csv"
    path.write_text("image,class,x0,y0,x1,y1\n"
                    f"{blue[0]['id']},{KIND_NAMES[1]},,,,\n"
                    f"{blue[1]['image']},{KIND_NAMES[1]},0,0,64,64\n"
                    "nowhere.png,ghost,0,0,8,8\n")
    labels = read_labels_file(path)
    assert labels[0] == ConfirmedLabel(blue[0]["id"], "blue_bar", None) and labels[1].box == (0, 0, 64, 64)
    data = load_train_data_for(folder)
    remaining, labelled, unmatched = apply_labels(data.novel, data.image_paths, labels)
    assert sorted(r.image_id for r in labelled) == sorted([blue[0]["id"], blue[1]["id"]])
    assert all(r.class_name == "blue_bar" for r in labelled)
    assert len(remaining) == len(data.novel) - 2 and unmatched == 1


def test_json_labels_may_be_a_mapping_and_bad_rows_name_the_file(tmp_path):
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({"img_0_0": "red_disk"}))
    assert read_labels_file(mapping) == [ConfirmedLabel("img_0_0", "red_disk")]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nimg_0_0,red\n")
    with pytest.raises(DataError, match="bad.csv"):
        read_labels_file(bad)
    boxed = tmp_path / "box.json"
    boxed.write_text(json.dumps([{"image": "a", "class": "b", "box": [5, 5, 1, 1]}]))
    with pytest.raises(DataError, match="x1 > x0"):
        read_labels_file(boxed)


def load_train_data_for(folder):
    return load_train_data(DiscoverJobConfig(data=folder / "data", out=folder / "unused", detections=folder,
                                             progress=False))
