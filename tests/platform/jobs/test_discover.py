import csv
import json

import pytest

from anomaly_discovery.cli import main
from anomaly_discovery.data.synthetic import generate_dataset
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.predict import DiscoveryPredictor
from anomaly_discovery.platform.jobs.detect import DetectConfig, run_detect
from anomaly_discovery.platform.jobs.discover import (DiscoverJobConfig, neu_base_regions, normal_images_of,
                                                      parse_base, parse_k, regions_from_detect_output, run_discover,
                                                      synthetic_base_regions, view_lines)
from anomaly_discovery.platform.jobs.evaluate import evaluate_output
from tests.conftest import shared_dataset

TINY = dict(cnn="tiny", view_size=64, batch_size=8, epochs=2, k_max=4)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("gen") / "data", n_images=60, seed=0, image_size=64,
                            progress=False).out_dir


@pytest.fixture(scope="module")
def detections(generated, tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "detect"
    run_detect(DetectConfig(data=generated / "metal_plate", out=out, format="mvtec", backbone="tiny",
                            image_size=64, object_prior="none", progress=False))
    return out


@pytest.fixture
def settings(tmp_path):
    path = tmp_path / "discovery.json"
    path.write_text(json.dumps(TINY))
    return path


def test_cli_discover_with_the_frozen_floor_trains_nothing_and_says_so(generated, detections, settings, tmp_path,
                                                                      capsys):
    out = tmp_path / "frozen"
    code = main(["discover", "--data", str(generated / "metal_plate"), "--format", "mvtec", "--detections",
                 str(detections), "--k", "3", "--model", "frozen", "--config", str(settings), "--out", str(out)])
    assert code == 0
    assert "no training (frozen views)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["discovery"]["kind"] == "frozen" and summary["history"] == []
    assert evaluate_output(out).metrics["k_true"] >= 2


def test_cli_discover_with_no_base_writes_a_summary_that_evaluate_scores(generated, detections, settings, tmp_path,
                                                                          capsys):
    out = tmp_path / "discover"
    code = main(["discover", "--data", str(generated / "metal_plate"), "--format", "mvtec", "--detections",
                 str(detections), "--k", "3", "--base", "none", "--config", str(settings), "--out", str(out),
                 "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "K = 3 (given)" in printed and "base set: none" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "discover" and summary["k"] == 3 and summary["k_estimated"] is None
    assert summary["config"]["format"] == "mvtec" and summary["config"]["discovery"]["view_size"] == 64
    detected = json.loads((detections / "summary.json").read_text())["images"]
    assert [r["image"] for r in summary["images"]] == [r["image"] for r in detected]
    for record in summary["images"]:
        assert record["class"] in {"novel_0", "novel_1", "novel_2"}
        assert record["regions"] and isinstance(record["is_outlier"], bool)
    assert summary["outlier_threshold"] is not None  # set on the novel crops themselves without a base set
    report = evaluate_output(out)
    assert report.kind == "discover" and report.n_images == len(detected)
    assert 0.0 <= report.metrics["nmi"] <= 1.0
    with open(out / "assignments.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(r["regions"]) for r in summary["images"])
    assert DiscoveryPredictor.load(out / "model").base_classes == []


@pytest.mark.parametrize("k_method", [None, "consensus"])
def test_discover_with_a_synthetic_base_and_k_auto(generated, detections, tmp_path, k_method):
    settings = TINY if k_method is None else TINY | {"k_method": k_method}  # None: the default criterion
    config = DiscoverJobConfig(data=generated / "metal_plate", out=tmp_path / "out", detections=detections,
                               base=f"synthetic:{generated}", base_per_class=3, k="auto",
                               discovery=DiscoveryConfig.of(**settings), progress=False)
    summary = run_discover(config)
    assert 2 <= summary.artifacts.k_estimated <= 4
    assert summary.artifacts.predictor.base_classes == sorted(
        ["crack", "fold", "hole", "missing_material", "scratch", "stain"])
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["k_estimated"] == summary.artifacts.k_estimated
    assert written["outlier_threshold"] is not None
    assert all(isinstance(r["is_outlier"], bool) for r in written["images"])
    described = summary.describe()  # the estimate, its criterion and (a consensus) each criterion's own K
    assert f"estimated, {config.discovery.classes.k_method}" in described
    votes = summary.artifacts.metrics.get("k_votes")  # each criterion's K, where the consensus decided
    if k_method == "consensus":
        assert votes
    else:  # the default: prediction strength, and the consensus only where prediction strength stopped at k = 2
        assert votes is None or votes["prediction_strength"] == 2
        assert votes is not None or summary.artifacts.k_estimated > 2
    if votes:
        assert all(f"{name} {k}" in described for name, k in votes.items())
    projected_by = summary.artifacts.metrics["nuisance_projection"]  # and what the views removed, in words
    assert "views: region " in described
    assert {"normal images": "the normal images' main variation removed",
            "own images": "the run's own images' main variation removed",
            "none": "nothing removed"}[projected_by] in described


def test_the_views_line_names_what_was_removed_and_at_how_many_groups_the_own_images_were_judged():
    weights = {"view_weights": {"region": 1.0, "crop": 0.0, "image": 0.0}}
    projected = weights | {"nuisance_projection": "own images", "own_images_silhouette": 0.21, "own_images_groups": 4}
    assert view_lines(projected) == ["views: region 1.00, crop 0.00, image 0.00; no normal images: the run's own "
                                     "images' main variation removed (their silhouette at 4 groups: 0.210)"]
    kept = weights | {"nuisance_projection": "none", "own_images_silhouette": 0.4, "own_images_groups": 6}
    assert "; nothing removed (their silhouette at 6 groups: 0.400); the run's own images form tight groups" in (
        view_lines(kept)[0])
    assert view_lines(kept)[0].endswith("set `own_projection: always` in --config")  # K given: no --k to give
    assert view_lines(kept, k_estimated=True)[0].endswith("set `own_projection: always` in --config or give --k")
    normals = weights | {"nuisance_projection": "normal images", "own_images_silhouette": None}
    assert view_lines(normals)[0].endswith("; the normal images' main variation removed")
    assert view_lines({"nuisance_projection": "none"}) == []


def test_synthetic_base_refuses_the_product_being_discovered(generated):
    with pytest.raises(ValueError, match="being discovered"):
        synthetic_base_regions(generated, generated / "metal_plate", per_class=1, seed=0, product="metal_plate",
                               progress=False)
    with pytest.raises(ValueError, match="being discovered"):
        synthetic_base_regions(generated, generated, per_class=1, seed=0, progress=False)


def test_synthetic_base_crops_at_most_per_class_images(generated):
    regions = synthetic_base_regions(generated, generated / "metal_plate", per_class=1, seed=0, progress=False)
    assert {r.class_name for r in regions} == {"crack", "fold", "hole", "missing_material", "scratch", "stain"}
    assert len({r.image_id for r in regions}) == 6
    assert all(r.image_id.startswith(str(generated / "bottle")) for r in regions)


@pytest.mark.parametrize("detector, uses_normals", [("patchcore", True), ("prn", True), ("ensemble", True),
                                                     ("zero-shot", False), ("maps", False)])
def test_discovery_reads_the_normal_images_of_every_detector_that_learned_from_them(generated, detector,
                                                                                     uses_normals):
    normals = sorted(str(p) for p in (generated / "metal_plate" / "train" / "good").glob("*.png"))
    found = normal_images_of({"detector": detector, "data": str(generated / "metal_plate"), "format": "mvtec"})
    assert normals and sorted(found) == (normals if uses_normals else [])


def test_regions_from_detect_output_follow_its_boxes(detections):
    regions, paths, config = regions_from_detect_output(detections, progress=False)
    records = json.loads((detections / "summary.json").read_text())["images"]
    assert [tuple(r.box) for r in regions] == [tuple(b["box"]) for rec in records for b in rec["regions"]]
    assert set(paths) == {rec["id"] for rec in records} and config["format"] == "mvtec"
    assert all(0.0 <= r.anomaly_map.min() and r.anomaly_map.max() <= 1.0 for r in regions)


def test_a_folder_that_is_not_a_detect_output_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"kind": "discover", "images": []}))
    with pytest.raises(Exception, match="not an `adisc detect` summary"):
        regions_from_detect_output(tmp_path)


def test_parse_k_and_base_name_the_bad_value():
    assert parse_k("4") == 4 and parse_k("auto") == "auto"
    with pytest.raises(ValueError, match="'zero'"):
        parse_k("zero")
    assert parse_base("none") == ("none", None)
    assert parse_base("neu:/data/neu")[0] == "neu"
    with pytest.raises(ValueError, match="coco:x"):
        parse_base("coco:x")


def test_discover_runs_detection_itself_without_a_detections_folder(generated, tmp_path):
    config = DiscoverJobConfig(data=generated / "metal_plate", out=tmp_path / "out", format="mvtec", k=2,
                               detect_backbone="tiny", detect_image_size=64, object_prior="none",
                               discovery=DiscoveryConfig.of(**TINY), progress=False)
    summary = run_discover(config)
    assert (tmp_path / "out" / "detect" / "summary.json").is_file()
    assert len(summary.artifacts.images) == len(json.loads((tmp_path / "out" / "detect" / "summary.json")
                                                           .read_text())["images"])
    assert evaluate_output(tmp_path / "out").metrics["k_true"] >= 2


@pytest.mark.shared_data
def test_neu_base_crops_come_from_the_labelled_boxes():
    regions = neu_base_regions(shared_dataset("neu-det"), per_class=2, seed=0, progress=False)
    names = {"crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"}
    assert {r.class_name for r in regions} <= names and len({r.class_name for r in regions}) >= 6
    assert len({r.image_id for r in regions}) == 12
    assert all(r.anomaly_map.max() == 1.0 and r.score == 1.0 for r in regions)


def _mtd_subset(root, out, folder_names: dict[str, str], per_class: int = 4):
    """A small MTD copy whose class folders carry ``folder_names``; the split file keeps two normal test images."""
    import shutil

    for source, target in folder_names.items():
        images = sorted((root / source / "Imgs").glob("*.jpg"))[:per_class if source != "MT_Free" else 8]
        (out / target / "Imgs").mkdir(parents=True)
        for image in images:
            for path in (image, image.with_suffix(".png")):
                if path.is_file():
                    shutil.copy(path, out / target / "Imgs" / path.name)
    normal = sorted(p.name for p in (out / "MT_Free" / "Imgs").glob("*.jpg"))
    (out.parent / "mtd_split.json").write_text(json.dumps({"normal_test": normal[:2]}))
    return out


def test_mtd_discovery_is_the_same_with_the_label_folders_renamed_to_meaningless_names(tmp_path):
    """No label leakage: the defect class folder names reach only the scorer, so renaming them (keeping their
    order) leaves every prediction unchanged."""
    root = shared_dataset("mtd")
    classes = ["MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Free", "MT_Uneven"]
    meaningless = ["MT_A7", "MT_B3", "MT_C9", "MT_D1", "MT_Free", "MT_X5"]  # same sort order
    runs = []
    for name, folders in (("named", classes), ("renamed", meaningless)):
        data = _mtd_subset(root, tmp_path / name / "mtd", dict(zip(classes, folders)))
        config = DiscoverJobConfig(data=data, out=tmp_path / name / "out", format="mtd", detect_backbone="tiny",
                                   detect_image_size=64, object_prior="fallback", k=3, base="none",
                                   discovery=DiscoveryConfig.of(**TINY), progress=False)
        run_discover(config)
        runs.append(json.loads((tmp_path / name / "out" / "summary.json").read_text()))
    named, renamed = runs
    assert len(named["images"]) == 22  # 20 defect images and the 2 normal test images
    assert [(r["class"], r["confidence"]) for r in renamed["images"]] == \
        [(r["class"], r["confidence"]) for r in named["images"]]
    text = json.dumps(renamed)
    assert not any(label in text for label in ("Blowhole", "Break", "Crack", "Fray", "Uneven"))
