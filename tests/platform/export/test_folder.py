"""The folder-per-class export: the layout, masks beside the images, links or copies, and the data set read by
torchvision's ImageFolder with the reviewed class names."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_discovery.data import load_image
from anomaly_discovery.platform.export.coco import region_mask
from anomaly_discovery.platform.export.folder import folder_name, write_folder
from anomaly_discovery.platform.export.snapshot import read_snapshot
from tests.platform.export.conftest import kind_of


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def test_imagefolder_reads_the_reviewed_classes_and_their_images(loop, reviewed, tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    write_folder(read_snapshot(loop.store, loop.embeddings), tmp_path)
    dataset = datasets.ImageFolder(str(tmp_path / "images" / "classes"))
    assert dataset.classes == sorted(["rust", "blue stain", reviewed.confirmed_kind])
    per_class = {name: sum(label == i for _, label in dataset.samples) for i, name in enumerate(dataset.classes)}
    assert per_class == {"rust": 11, "blue stain": 12, reviewed.confirmed_kind: 12}
    for path, label in dataset.samples:
        kind = kind_of(str(Path(path).resolve()))
        assert {"stain": "blue stain"}.get(kind, kind) == dataset.classes[label]
    image, label = dataset[0]
    assert image.size == (64, 64)


def test_unknown_rejected_and_proposed_are_kept_apart_with_masks_beside(loop, reviewed, tmp_path):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    summary = write_folder(snapshot, tmp_path)
    assert summary.images == {"classes/blue stain": 12, f"classes/{reviewed.confirmed_kind}": 12, "classes/rust": 11,
                              "rejected": 13}
    rejected = [f for f in files(tmp_path) if f.startswith("images/rejected/")]
    assert len(rejected) == 13 and all(kind_of(str((tmp_path / f).resolve())) in (reviewed.rejected_kind, "rust")
                                       for f in rejected)
    table = pd.read_csv(tmp_path / "regions.csv")
    assert len(table) == 48 and set(table["status"]) == {"known", "confirmed", "rejected"}
    for row in table.itertuples():
        image, mask = tmp_path / row.file, load_image(tmp_path / row.mask_file, mode="L") > 0
        assert image.is_symlink() and image.resolve() == Path(row.image_path).resolve()
        expected, _ = region_mask(row.mask_path, mask.shape, (row.x0, row.y0, row.x1, row.y1))
        np.testing.assert_array_equal(mask, expected)
        assert Path(row.mask_file).stem == Path(row.file).stem, "anomalib pairs images and masks by name"
        assert Path(row.mask_file).parent.relative_to("masks") == Path(row.file).parent.relative_to("images")


def test_an_open_proposal_goes_to_proposed_and_copy_copies(loop, tmp_path):
    summary = write_folder(read_snapshot(loop.store, loop.embeddings), tmp_path, copy=True)
    assert sorted(summary.images) == ["classes/rust", "classes/stain", "proposed/new-3", "proposed/new-4"]
    images = [tmp_path / f for f in files(tmp_path) if f.startswith("images/")]
    assert len(images) == 48 and not any(p.is_symlink() for p in images)


def test_images_without_regions_go_to_normal(loop, tmp_path):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    first = snapshot.regions["region_id"].iloc[0]
    image_id = snapshot.regions["image_id"].iloc[0]
    snapshot = replace(snapshot, regions=snapshot.regions[snapshot.regions["region_id"] != first])
    summary = write_folder(snapshot, tmp_path)
    assert summary.images["normal"] == 1
    assert files(tmp_path / "images" / "normal")[0].startswith(f"{image_id}_")


@pytest.mark.parametrize(("name", "folder"), [("scratch", "scratch"), ("a/b", "a_b"), ("..", "_.."),
                                              ("tab\there", "tab_here"), ("Ölfleck", "Ölfleck")])
def test_class_names_become_one_path_component(name, folder):
    assert folder_name(name) == folder


def test_two_classes_that_would_share_a_folder_get_their_ids(loop, tmp_path):
    for old, new in (("rust", "a/b"), ("stain", "a_b")):
        row = next(c for c in loop.classes.values() if c.name == old)
        loop.rename(row.id, new, expected_version=row.version)
    ids = {c.name: c.id for c in loop.classes.values()}
    summary = write_folder(read_snapshot(loop.store, loop.embeddings), tmp_path)
    assert {summary.class_folders[str(ids["a/b"])], summary.class_folders[str(ids["a_b"])]} == {
        "classes/a_b", f"classes/a_b-{max(ids['a/b'], ids['a_b'])}"}
