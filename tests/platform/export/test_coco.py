"""The COCO export: the RLE encoding, region masks from the detect-style mask files, and the document read back
with pycocotools (and by a schema check that needs nothing installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly_discovery.data import save_image
from anomaly_discovery.data.images import image_size
from anomaly_discovery.platform.export.coco import coco_document, coco_json, coco_rle, region_mask
from anomaly_discovery.platform.export.snapshot import read_snapshot
from tests.platform.export.conftest import kind_of


def decode_rle(rle: dict) -> np.ndarray:
    """The schema's own decoder: alternating background / foreground runs, column-major."""
    height, width = rle["size"]
    flat = np.zeros(height * width, bool)
    position = 0
    for i, run in enumerate(rle["counts"]):
        flat[position:position + run] = i % 2 == 1
        position += run
    assert position == height * width, "the runs must cover the image exactly"
    return flat.reshape((height, width), order="F")


@pytest.mark.parametrize("pattern", ["empty", "full", "corner", "random"])
def test_rle_round_trips(pattern, rng):
    mask = {"empty": np.zeros((5, 7), bool), "full": np.ones((5, 7), bool),
            "corner": np.pad(np.ones((2, 2), bool), ((0, 3), (0, 5))), "random": rng.random((9, 4)) > 0.5}[pattern]
    rle = coco_rle(mask)
    np.testing.assert_array_equal(decode_rle(rle), mask)
    assert (rle["counts"][0] == 0) == bool(mask.ravel(order="F")[0]), "runs start with background"


def test_rle_matches_pycocotools(rng):
    mask_utils = pytest.importorskip("pycocotools.mask")
    mask = rng.random((13, 11)) > 0.6
    decoded = mask_utils.decode(mask_utils.frPyObjects(coco_rle(mask), 13, 11))
    np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_region_mask_reads_the_mask_file_inside_the_box_resized_to_the_image(tmp_path):
    whole = np.zeros((32, 32), bool)
    whole[4:12, 4:12] = whole[20:28, 20:28] = True
    save_image(tmp_path / "mask.png", whole)
    mask, source = region_mask(str(tmp_path / "mask.png"), (64, 64), (8, 8, 24, 24))
    assert source == "mask" and mask.shape == (64, 64)
    assert mask[8:24, 8:24].all() and mask.sum() == 16 * 16, "only the first blob, scaled x2, lies in the box"
    mask, source = region_mask(None, (10, 10), (2, 3, 5, 9))
    assert source == "box" and mask.sum() == 3 * 6 and mask[3:9, 2:5].all()
    mask, source = region_mask(str(tmp_path / "mask.png"), (64, 64), (0, 30, 10, 40))
    assert source == "box", "a box where the mask file has nothing falls back to the box"


def test_the_document_reflects_the_review_and_passes_the_schema_check(loop, reviewed):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    document = json.loads(coco_json(coco_document(snapshot)))
    assert {"info", "images", "categories", "annotations"} <= set(document)
    assert document["info"]["model_version"] == "discovery-1"
    assert document["info"]["last_decision"]["id"] == reviewed.last_decision
    categories = {c["id"]: c for c in document["categories"]}
    assert {(c["name"], c["status"]) for c in categories.values()} == {
        ("rust", "known"), ("blue stain", "known"), (reviewed.confirmed_kind, "confirmed"), ("rejected", "rejected")}
    images = {i["id"]: i for i in document["images"]}
    assert len(images) == 48 and len(document["annotations"]) == 48
    for annotation in document["annotations"]:
        image = images[annotation["image_id"]]
        assert (image["height"], image["width"]) == image_size(image["file_name"])
        mask = decode_rle(annotation["segmentation"])
        assert mask.shape == (image["height"], image["width"]) and mask.sum() == annotation["area"] > 0
        x, y, w, h = annotation["bbox"]
        assert not mask[:y].any() and not mask[y + h:].any() and not mask[:, :x].any() and not mask[:, x + w:].any()
        category = categories[annotation["category_id"]]
        assert category["status"] == annotation["status"]
        kind = kind_of(image["file_name"])
        if kind == reviewed.rejected_kind or annotation["id"] == reviewed.dropped_region:
            assert category["name"] == "rejected"
        else:
            assert category["name"] == {"stain": "blue stain"}.get(kind, kind)
        assert annotation["mask_source"] == "mask" and annotation["outlier_score"] >= 0


def test_the_document_loads_in_pycocotools(loop, reviewed, tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    path = tmp_path / "annotations.json"
    snapshot = read_snapshot(loop.store, loop.embeddings)
    path.write_bytes(coco_json(coco_document(snapshot)))
    coco = coco_api.COCO(str(path))
    confirmed = coco.getCatIds(catNms=[reviewed.confirmed_kind])
    assert len(coco.getAnnIds(catIds=confirmed)) == 12
    annotation = coco.loadAnns(coco.getAnnIds(catIds=confirmed))[0]
    region = snapshot.regions.set_index("region_id").loc[annotation["id"]]
    expected, _ = region_mask(region["mask_path"], image_size(region["image_path"]),
                              (region["x0"], region["y0"], region["x1"], region["y1"]))
    np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), expected)


def with_image_gone(snapshot, folder) -> str:
    """Point the snapshot's first image (and its regions) at a file that does not exist, as a store does whose
    image was deleted; the shared world's files stay as they are."""
    gone = str(folder / "deleted.png")
    first = snapshot.images["image_id"].iloc[0]
    snapshot.images.loc[snapshot.images["image_id"] == first, "image_path"] = gone
    snapshot.regions.loc[snapshot.regions["image_id"] == first, "image_path"] = gone
    return gone


def test_an_image_file_that_is_gone_stops_the_export_unless_skipped(loop, tmp_path):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    gone = with_image_gone(snapshot, tmp_path)
    with pytest.raises(ValueError, match="1 image file.*deleted.png.*--skip-missing"):
        coco_document(snapshot)
    document = coco_document(snapshot, skip_missing=True)
    assert document["skipped_images"] == [gone] and len(document["images"]) == 47
    assert len(document["annotations"]) == 47
