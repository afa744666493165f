import json
import shutil

import numpy as np
import pytest

from anomaly_discovery.cli import main
from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.platform.jobs.detect import DetectConfig, run_detect
from anomaly_discovery.platform.jobs.evaluate import evaluate_output


@pytest.fixture(scope="module")
def bottle_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    generate_dataset(root, n_images=60, seed=1, progress=False)
    return root / "metal_plate"


def _config(data, out, **overrides):
    values = dict(data=data, out=out, format="mvtec", detector="patchcore", backbone="tiny", image_size=96,
                  object_prior="fallback", progress=False)
    return DetectConfig(**(values | overrides))


def test_detect_writes_maps_masks_crops_and_summary(bottle_data, tmp_path):
    summary = run_detect(_config(bottle_data, tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["kind"] == "detect" and len(written["images"]) == len(summary.results) > 0
    record = written["images"][0]
    folder = tmp_path / "out" / "images" / record["id"]
    for name in ("anomaly_map.npy", "anomaly_map.png", "mebin_mask.png", "object_mask.png"):
        assert (folder / name).is_file(), name
    assert all((tmp_path / "out" / region["crop"]).is_file() for region in record["regions"])
    assert np.load(folder / "anomaly_map.npy").shape == (256, 256)
    assert "fit" in written["seconds"] and written["config"]["detector"] == "patchcore"
    assert written["detector_image_size"] == 96


@pytest.mark.parametrize("detector, own_size", [("patchcore", 320), ("zero-shot", 256), ("prn", 256),
                                                      ("ensemble", 320)])
def test_detectors_keep_their_own_input_size_unless_one_is_given(bottle_data, tmp_path, detector, own_size):
    from anomaly_discovery.platform.jobs.detect import build_detector

    built = build_detector(_config(bottle_data, tmp_path, detector=detector, image_size=None))
    assert built.image_size == own_size
    given = build_detector(_config(bottle_data, tmp_path, detector=detector, image_size=64))
    assert given.image_size == 64


def test_ensemble_fits_patchcore_and_prn_and_leaves_prns_real_anomalies_out_of_its_output(tmp_path):
    generate_dataset(tmp_path / "gen", n_images=110, seed=2, progress=False)
    data = tmp_path / "gen" / "metal_plate"
    summary = run_detect(_config(data, tmp_path / "out", detector="ensemble", image_size=64))
    patchcore, prn = summary.detector.members
    assert patchcore.image_size == prn.image_size == 64 and prn.n_real_anomalies_ == 10
    n_test = sum(1 for path in (data / "test").rglob("*.png"))
    assert len(summary.results) == n_test - 10
    n_normal = sum(1 for _ in (data / "train" / "good").glob("*.png"))
    assert summary.n_fit_images == n_normal and summary.detector.n_calibration_ == max(8, round(0.1 * n_normal))
    metrics = evaluate_output(tmp_path / "out").metrics
    assert metrics["image_auroc"] > 0.75 and metrics["pixel_auroc"] > 0.8


def test_ensemble_runs_patchcore_on_its_backbone_pair_only_for_the_default_backbone(bottle_data, tmp_path):
    from anomaly_discovery.platform.jobs.detect import ensemble_backbones

    default = DetectConfig(data=bottle_data, out=tmp_path, detector="ensemble")
    assert ensemble_backbones(default) == ("mobilenet_v2", "efficientnet_lite0")
    assert ensemble_backbones(_config(bottle_data, tmp_path, detector="ensemble")) == ("tiny",)
    with_weights = DetectConfig(data=bottle_data, out=tmp_path, detector="ensemble", weights=tmp_path / "net.pt")
    assert ensemble_backbones(with_weights) == ("mobilenet_v2",)


def test_ensemble_with_too_few_normal_images_is_a_clear_error(bottle_data, tmp_path):
    with pytest.raises(ValueError, match="the ensemble needs at least 16 normal images"):
        run_detect(_config(bottle_data, tmp_path / "out", detector="ensemble"))


def test_detect_never_reads_labels_of_the_images(bottle_data, tmp_path):
    summary = run_detect(_config(bottle_data, tmp_path / "out"))
    written = (tmp_path / "out" / "summary.json").read_text()
    assert '"label"' not in written
    assert summary.n_fit_images == 11


def test_evaluate_scores_a_detect_output(bottle_data, tmp_path):
    run_detect(_config(bottle_data, tmp_path / "out"))
    report = evaluate_output(tmp_path / "out")
    assert set(report.metrics) == {"image_auroc", "pixel_auroc", "aupro"}
    assert report.metrics["pixel_auroc"] > 0.6


def test_zero_shot_detector_needs_no_normal_images(bottle_data, tmp_path):
    summary = run_detect(_config(bottle_data, tmp_path / "out", detector="zero-shot"))
    assert summary.n_fit_images == 0 and len(summary.results) == 19


def test_patchcore_without_normal_images_is_a_clear_error(tmp_path, rng):
    from tests.conftest import write_png

    for cls in ("scratch", "stain"):
        write_png(tmp_path / "d" / cls / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="needs normal training images"):
        run_detect(_config(tmp_path / "d", tmp_path / "out", format="folder"))


def test_external_maps_feed_the_same_pipeline(bottle_data, tmp_path):
    run_detect(_config(bottle_data, tmp_path / "first"))
    maps = tmp_path / "maps"
    for folder in (tmp_path / "first" / "images").iterdir():
        parts = folder.name.split("__")
        target = maps / "/".join(parts[:-1])
        target.mkdir(parents=True, exist_ok=True)
        np.save(target / f"{parts[-1]}.npy", np.load(folder / "anomaly_map.npy").astype(np.float32))
    summary = run_detect(_config(bottle_data, tmp_path / "second", detector="maps", maps=maps))
    assert len(summary.results) == 19
    first = evaluate_output(tmp_path / "first").metrics["pixel_auroc"]
    assert evaluate_output(tmp_path / "second").metrics["pixel_auroc"] == pytest.approx(first, abs=1e-3)


def test_detect_cli_reports_a_missing_folder_clearly(tmp_path, capsys):
    assert main(["detect", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert "nope" in capsys.readouterr().err


def test_zero_shot_detect_runs_on_a_neu_det_subset_through_the_cli(tmp_path):
    """NEU-DET has no normal images: the zero-shot detector maps every image (skipped without ../shared)."""
    import shutil

    from anomaly_discovery.data import load_image
    from tests.conftest import shared_dataset

    root = shared_dataset("neu-det")
    subset = tmp_path / "neu"
    for kind in ("IMAGES", "ANNOTATIONS"):
        (subset / kind).mkdir(parents=True)
    for cls in ("crazing", "inclusion", "scratches"):
        for number in (1, 2, 3):
            shutil.copy(root / "IMAGES" / f"{cls}_{number}.jpg", subset / "IMAGES")
            shutil.copy(root / "ANNOTATIONS" / f"{cls}_{number}.xml", subset / "ANNOTATIONS")
    assert main(["detect", "--data", str(subset), "--format", "neu", "--detector", "zero-shot", "--backbone", "tiny",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(written["images"]) == 9 and written["n_fit_images"] == 0
    assert written["detector_image_size"] == 256
    for record in written["images"]:
        height, width = load_image(record["image"]).shape[:2]
        assert np.load(tmp_path / "out" / "images" / record["id"] / "anomaly_map.npy").shape == (height, width)


def _linked_copy(source, target):
    """``target`` mirrors ``source``'s folders, each file a symlink to the original (how data is often assembled)."""
    for path in sorted(source.rglob("*")):
        link = target / path.relative_to(source)
        if path.is_dir():
            link.mkdir(parents=True, exist_ok=True)
        else:
            link.symlink_to(path)
    return target


def test_a_symlinked_mvtec_layout_keeps_one_output_per_image(bottle_data, tmp_path):
    linked = _linked_copy(bottle_data, tmp_path / "linked" / "metal_plate")
    summary = run_detect(_config(linked, tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    ids = [record["id"] for record in written["images"]]
    names = [r.sample.image_path.name for r in summary.results]
    assert len(names) > len(set(names)), "the defect types share file names (000.png, ...)"
    assert len(set(ids)) == len(ids) == len(summary.results)
    assert "test__good__000" in ids and sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(ids)
    assert evaluate_output(tmp_path / "out").n_images == len(ids)


def test_the_same_file_name_in_two_class_folders_gives_two_ids(tmp_path, rng):
    from anomaly_discovery.data import read_dataset
    from anomaly_discovery.platform.jobs.detect import image_ids
    from tests.conftest import write_png

    for cls in ("scratch", "stain"):
        write_png(tmp_path / "line" / cls / "b.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    samples = read_dataset(tmp_path / "line", "folder").samples
    assert image_ids(samples, tmp_path / "line") == ["scratch__b", "stain__b"]


def test_two_files_with_one_id_are_an_error_naming_both(tmp_path, rng):
    from anomaly_discovery.data import DataError, read_dataset
    from anomaly_discovery.platform.jobs.detect import image_ids
    from tests.conftest import write_png

    write_png(tmp_path / "line" / "scratch" / "b.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "line" / "scratch" / "b.jpg")
    samples = read_dataset(tmp_path / "line", "folder").samples
    with pytest.raises(DataError, match=r"b\.(png|jpg).*scratch__b.*b\.(png|jpg)"):
        image_ids(samples, tmp_path / "line")


def test_detect_and_discover_metrics_without_any_mask(tmp_path):
    from anomaly_discovery.models.discovery.config import DiscoveryConfig
    from anomaly_discovery.platform.jobs.discover import DiscoverJobConfig, run_discover

    root = tmp_path / "gen"
    generate_dataset(root, n_images=60, seed=2, progress=False)
    data = root / "metal_plate"
    shutil.rmtree(data / "ground_truth")
    run_detect(_config(data, tmp_path / "detect"))
    detection = evaluate_output(tmp_path / "detect")
    assert set(detection.metrics) == {"image_auroc"}
    assert any("no pixel masks available" in note and "defect images" in note for note in detection.notes)
    run_discover(DiscoverJobConfig(data=data, out=tmp_path / "discover", format="mvtec", detections=tmp_path / "detect",
                                   k=3, discovery=DiscoveryConfig.of(kind="transformer", cnn="tiny", image_size=32,
                                                                     depth=1, epochs=1),
                                   progress=False))
    discovery = evaluate_output(tmp_path / "discover")
    assert {"nmi", "ari", "f1"} <= set(discovery.metrics) and discovery.metrics["k_true"] >= 2
