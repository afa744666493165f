from collections import Counter

import numpy as np
import pytest

from anomaly_discovery.data import LayoutError, ImageReadError, read_dataset, detect_format
from anomaly_discovery.data.errors import DataError
from tests.conftest import shared_dataset, write_png


def _mvtec_tree(root, rng):
    img = lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    for i in range(3):
        write_png(root / "bottle" / "train" / "good" / f"{i:03d}.png", img())
    write_png(root / "bottle" / "test" / "good" / "000.png", img())
    for defect in ("crack", "hole"):
        for i in range(2):
            write_png(root / "bottle" / "test" / defect / f"{i:03d}.png", img())
            write_png(root / "bottle" / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def test_mvtec_reader_gives_labels_splits_and_masks(tmp_path, rng):
    report = read_dataset(_mvtec_tree(tmp_path, rng), "mvtec")
    counts = Counter((s.split, s.label) for s in report.samples)
    assert counts == {("train", "good"): 3, ("test", "good"): 1, ("test", "crack"): 2, ("test", "hole"): 2}
    defects = [s for s in report.samples if not s.is_normal]
    assert all(s.mask_path.name == f"{s.name}_mask.png" for s in defects)
    assert all(s.mask_path is None for s in report.samples if s.is_normal)
    assert {s.product for s in report.samples} == {"bottle"}


def test_mvtec_reader_accepts_a_single_product_folder(tmp_path, rng):
    root = _mvtec_tree(tmp_path, rng)
    assert len(read_dataset(root / "bottle", "mvtec").samples) == 8


def test_a_defect_image_without_its_mask_is_read_without_one(tmp_path, rng):
    root = _mvtec_tree(tmp_path, rng)
    (root / "bottle" / "ground_truth" / "hole" / "001_mask.png").unlink()
    report = read_dataset(root, "mvtec")
    hole = {s.name: s.mask_path for s in report.samples if s.label == "hole"}
    assert hole["001"] is None and hole["000"].name == "000_mask.png"
    assert report.defects_without_mask == 1 and "1 defect images without a mask" in report.summary()


def test_an_mvtec_product_without_ground_truth_is_read(tmp_path, rng):
    root = _mvtec_tree(tmp_path, rng)
    for mask in (root / "bottle" / "ground_truth").rglob("*.png"):
        mask.unlink()
    report = read_dataset(root, "mvtec")
    assert len(report.samples) == 8 and all(s.mask_path is None for s in report.samples)
    assert report.defects_without_mask == 4


def test_mtd_images_without_their_mask_file_are_read(tmp_path, rng):
    for folder, names in (("MT_Crack", ("a", "b")), ("MT_Free", ("n0", "n1"))):
        for name in names:
            write_png(tmp_path / "mtd" / folder / "Imgs" / f"{name}.jpg", rng.integers(0, 256, (12, 12), np.uint8))
    write_png(tmp_path / "mtd" / "MT_Crack" / "Imgs" / "a.png", np.full((12, 12), 255, np.uint8))
    (tmp_path / "mtd_split.json").write_text('{"normal_test": ["n1.jpg"]}')
    masks = {s.name: s.mask_path for s in read_dataset(tmp_path / "mtd", "mtd").samples if s.label == "Crack"}
    assert masks["a"].name == "a.png" and masks["b"] is None


def test_mask_of_other_size_is_an_error_naming_it(tmp_path, rng):
    root = _mvtec_tree(tmp_path, rng)
    write_png(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageReadError, match="000_mask.png.*differs"):
        read_dataset(root, "mvtec")


def test_bad_files_are_skipped_and_counted_when_asked(tmp_path, rng):
    root = _mvtec_tree(tmp_path, rng)
    (root / "bottle" / "train" / "good" / "003.png").write_bytes(b"")
    (root / "bottle" / "train" / "good" / "004.png").write_text("junk")
    with pytest.raises(ImageReadError, match="003.png"):
        read_dataset(root, "mvtec")
    report = read_dataset(root, "mvtec", skip_bad=True)
    assert len(report.samples) == 8 and len(report.skipped) == 2
    assert "2 bad files skipped" in report.summary()


def test_folder_reader_with_parallel_masks(tmp_path, rng):
    for cls in ("scratch", "stain"):
        for i in range(2):
            write_png(tmp_path / "imgs" / cls / f"{cls}{i}.png", rng.integers(0, 256, (10, 10), dtype=np.uint8))
            write_png(tmp_path / "masks" / cls / f"{cls}{i}_mask.png", np.full((10, 10), 255, np.uint8))
    report = read_dataset(tmp_path / "imgs", "folder", masks_root=tmp_path / "masks")
    assert Counter(s.label for s in report.samples) == {"scratch": 2, "stain": 2}
    assert all(s.mask_path is not None for s in report.samples)


def test_empty_folder_is_a_layout_error(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(LayoutError, match="no images"):
        read_dataset(tmp_path, "folder")


def test_unknown_layout_is_refused(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"x")
    with pytest.raises(LayoutError, match="unknown layout"):
        detect_format(tmp_path)


def test_missing_dataset_folder_is_refused(tmp_path):
    with pytest.raises(LayoutError, match="not found"):
        read_dataset(tmp_path / "nope", "mvtec")


def test_unknown_format_name_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        read_dataset(tmp_path, "coco")


def test_neu_reader_scales_boxes_to_image_size(tmp_path, rng):
    write_png(tmp_path / "IMAGES" / "patches_1.jpg", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (tmp_path / "ANNOTATIONS").mkdir()
    (tmp_path / "ANNOTATIONS" / "patches_1.xml").write_text(
        "<annotation><size><width>20</width><height>20</height></size>"
        "<object><name>patches</name><bndbox><xmin>2</xmin><ymin>4</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>"
        "<object><name>inclusion</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "</annotation>")
    (sample,) = read_dataset(tmp_path, "neu").samples
    assert sample.label == "patches"
    assert [(b.label, b.x0, b.y0, b.x1, b.y1) for b in sample.boxes] == [
        ("patches", 4, 8, 20, 24), ("inclusion", 0, 0, 10, 10)]


def test_neu_reader_refuses_broken_annotation(tmp_path, rng):
    write_png(tmp_path / "IMAGES" / "crazing_1.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "ANNOTATIONS").mkdir()
    (tmp_path / "ANNOTATIONS" / "crazing_1.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="crazing_1.xml"):
        read_dataset(tmp_path, "neu")


@pytest.mark.shared_data
def test_mtd_counts_match_the_dataset_readme():
    report = read_dataset(shared_dataset("mtd"), "mtd")
    counts = Counter(s.label for s in report.samples)
    assert counts == {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103, "good": 952}
    normal_split = Counter(s.split for s in report.samples if s.is_normal)
    assert normal_split == {"train": 761, "test": 191}
    assert all(s.split == "test" and s.mask_path is not None for s in report.samples if not s.is_normal)


@pytest.mark.shared_data
def test_neu_counts_match_the_dataset_readme():
    report = read_dataset(shared_dataset("neu-det"), "neu")
    assert Counter(s.label for s in report.samples) == {
        "crazing": 300, "inclusion": 300, "patches": 300, "pitted_surface": 300, "rolled-in_scale": 300,
        "scratches": 300}
    two_class = sum(len({b.label for b in s.boxes}) > 1 for s in report.samples)
    assert two_class == 123
    assert all(0 <= b.x0 < b.x1 <= 416 and 0 <= b.y0 < b.y1 <= 416 for s in report.samples for b in s.boxes)
