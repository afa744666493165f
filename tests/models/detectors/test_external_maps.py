import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomaly_discovery.data.errors import DataError, ImageReadError
from anomaly_discovery.data.images import save_image
from anomaly_discovery.models.detectors.protocol import Detector
from anomaly_discovery.models.detectors.external_maps import ExternalMapDetector, MapReadError, read_map

H, W = 24, 32


@pytest.fixture
def anomaly_map():
    values = np.zeros((H, W), np.float32)
    values[5:9, 10:14] = 0.75
    values[0, 0] = 0.1
    return values


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "images" / "part_001.png"
    save_image(path, np.zeros((H, W, 3), np.uint8))
    return path


@pytest.fixture
def maps_dir(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    return folder


def test_reads_npy_maps_by_image_stem_and_scores_by_their_maximum(maps_dir, image_path, anomaly_map):
    np.save(maps_dir / "part_001.npy", anomaly_map)
    detector = ExternalMapDetector(maps_dir)
    (detection,) = detector.predict_paths([image_path])
    assert detection.score == pytest.approx(0.75)
    assert detection.anomaly_map.dtype == np.float32 and np.array_equal(detection.anomaly_map, anomaly_map)


def test_reads_8_bit_png_maps(maps_dir, image_path):
    values = np.zeros((H, W), np.uint8)
    values[3, 4] = 200
    Image.fromarray(values).save(maps_dir / "part_001.png")
    (detection,) = ExternalMapDetector(maps_dir).predict_paths([image_path])
    assert detection.score == 200 and detection.anomaly_map[3, 4] == 200


def test_reads_16_bit_png_maps_keeping_their_values(maps_dir, image_path):
    values = np.zeros((H, W), np.uint16)
    values[3, 4] = 40000
    Image.fromarray(values).save(maps_dir / "part_001.png")
    (detection,) = ExternalMapDetector(maps_dir).predict_paths([image_path])
    assert detection.score == 40000


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
def test_reads_tiff_maps_and_drops_singleton_axes(maps_dir, image_path, anomaly_map, suffix):
    tifffile.imwrite(maps_dir / f"part_001{suffix}", anomaly_map[None])
    (detection,) = ExternalMapDetector(maps_dir).predict_paths([image_path])
    assert np.array_equal(detection.anomaly_map, anomaly_map)


def test_anomalib_layout_finds_category_and_defect_type_folders(tmp_path, maps_dir, anomaly_map):
    image = tmp_path / "mvtec" / "bottle" / "test" / "broken_large" / "000.png"
    other = tmp_path / "mvtec" / "bottle" / "test" / "contamination" / "000.png"
    for path in (image, other):
        save_image(path, np.zeros((H, W), np.uint8))
    (maps_dir / "bottle" / "broken_large").mkdir(parents=True)
    (maps_dir / "bottle" / "contamination").mkdir(parents=True)
    np.save(maps_dir / "bottle" / "broken_large" / "000_anomaly_map.npy", anomaly_map)
    np.save(maps_dir / "bottle" / "contamination" / "000.npy", anomaly_map * 2)
    detector = ExternalMapDetector(maps_dir, layout="anomalib")
    first, second = detector.predict_paths([image, other])
    assert first.score == pytest.approx(0.75) and second.score == pytest.approx(1.5)


def test_anomalib_layout_mirrors_the_image_folders(tmp_path, maps_dir, anomaly_map):
    image = tmp_path / "mtd" / "MT_Crack" / "Imgs" / "exp1.png"
    save_image(image, np.zeros((H, W), np.uint8))
    (maps_dir / "MT_Crack" / "Imgs").mkdir(parents=True)
    np.save(maps_dir / "MT_Crack" / "Imgs" / "exp1.npy", anomaly_map)
    detector = ExternalMapDetector(maps_dir, layout="anomalib")
    assert detector.map_path(image) == maps_dir / "MT_Crack" / "Imgs" / "exp1.npy"


def test_scores_file_overrides_the_map_maximum(maps_dir, image_path, anomaly_map):
    np.save(maps_dir / "part_001.npy", anomaly_map)
    (maps_dir / "scores.json").write_text(json.dumps({"part_001": 0.3}))
    (detection,) = ExternalMapDetector(maps_dir).predict_paths([image_path])
    assert detection.score == 0.3


def test_scores_csv_accepts_keys_with_the_image_suffix(tmp_path, maps_dir, image_path, anomaly_map):
    np.save(maps_dir / "part_001.npy", anomaly_map)
    scores = tmp_path / "elsewhere.csv"
    scores.write_text("image,score\npart_001.png,0.9\n")
    (detection,) = ExternalMapDetector(maps_dir, scores_file=scores).predict_paths([image_path])
    assert detection.score == 0.9


def test_scores_file_missing_an_image_is_an_error_naming_the_file(maps_dir, image_path, anomaly_map):
    np.save(maps_dir / "part_001.npy", anomaly_map)
    (maps_dir / "scores.json").write_text(json.dumps({"other": 0.3}))
    with pytest.raises(MapReadError, match=r"scores\.json.*part_001"):
        ExternalMapDetector(maps_dir).predict_paths([image_path])


def test_map_of_the_wrong_size_is_refused_with_both_sizes(maps_dir, image_path):
    np.save(maps_dir / "part_001.npy", np.zeros((H, W + 1), np.float32))
    with pytest.raises(MapReadError, match=rf"part_001\.npy.*{W + 1}x{H}.*{W}x{H}"):
        ExternalMapDetector(maps_dir).predict_paths([image_path])


def test_map_with_nan_is_refused_naming_the_file(maps_dir, image_path, anomaly_map):
    anomaly_map[2, 2] = np.nan
    np.save(maps_dir / "part_001.npy", anomaly_map)
    with pytest.raises(MapReadError, match=r"part_001\.npy.*NaN"):
        ExternalMapDetector(maps_dir).predict_paths([image_path])


def test_map_with_inf_is_refused(tmp_path):
    path = tmp_path / "m.tiff"
    tifffile.imwrite(path, np.array([[0.0, np.inf], [1.0, 2.0]], np.float32))
    with pytest.raises(MapReadError, match="infinite"):
        read_map(path)


def test_missing_map_is_refused_naming_the_image_and_what_was_looked_for(maps_dir, image_path):
    with pytest.raises(MapReadError, match=r"part_001\.png.*part_001\[_anomaly_map\]"):
        ExternalMapDetector(maps_dir).predict_paths([image_path])


def test_non_2d_maps_and_colour_pngs_are_refused(tmp_path):
    np.save(tmp_path / "stack.npy", np.zeros((2, H, W), np.float32))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "heatmap.png")
    with pytest.raises(MapReadError, match=r"stack\.npy.*\(2, 24, 32\)"):
        read_map(tmp_path / "stack.npy")
    with pytest.raises(MapReadError, match=r"heatmap\.png.*RGB"):
        read_map(tmp_path / "heatmap.png")


def test_corrupt_map_file_is_refused(tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(MapReadError, match=r"broken\.npy.*not a readable"):
        read_map(tmp_path / "broken.npy")


def test_missing_image_is_reported_by_the_image_reader(maps_dir, tmp_path, anomaly_map):
    np.save(maps_dir / "ghost.npy", anomaly_map)
    with pytest.raises(ImageReadError, match="ghost.png"):
        ExternalMapDetector(maps_dir).predict_paths([tmp_path / "ghost.png"])


def test_follows_the_detector_protocol_with_a_no_op_fit_and_a_clear_predict_error(maps_dir):
    detector = ExternalMapDetector(maps_dir)
    assert isinstance(detector, Detector) and detector.fit([np.zeros((4, 4), np.uint8)]) is detector
    with pytest.raises(TypeError, match="predict_paths"):
        detector.predict([np.zeros((4, 4), np.uint8)])


def test_bad_folder_and_layout_are_refused(tmp_path, maps_dir):
    with pytest.raises(DataError, match="not found"):
        ExternalMapDetector(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'nested'"):
        ExternalMapDetector(maps_dir, layout="nested")
