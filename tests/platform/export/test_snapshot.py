"""The snapshot every export reads: region statuses after real reviewer actions, who decided, the k-NN outlier
scores, the classes with their representatives, and what it says it reflects."""

from __future__ import annotations

import numpy as np

from anomaly_discovery.platform.export.snapshot import REGION_COLUMNS, knn_outlier_scores, read_snapshot, regions_csv
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile
from tests.platform.export.conftest import REVIEWER, kind_of


def test_a_fresh_discovery_run_reads_as_known_classes_and_open_proposals(loop):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    regions = snapshot.regions
    assert list(regions.columns) == list(REGION_COLUMNS) and len(regions) == 48
    known = regions[regions["image_path"].map(kind_of).isin(["rust", "stain"])]
    assert (known["status"] == "known").all() and (known["class_name"] == known["image_path"].map(kind_of)).all()
    assert (regions.loc[~regions.index.isin(known.index), "status"] == "proposed").all()
    assert (regions["decided_by"] == "model").all() and regions["decision_id"].isna().all()
    assert snapshot.last_decision is None and snapshot.model_version == "discovery-1"
    assert snapshot.counts() == {"known": 24, "confirmed": 0, "proposed": 24, "unknown": 0, "rejected": 0}


def test_reviewer_actions_show_as_statuses_names_and_deciders(loop, reviewed):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    regions = snapshot.regions.set_index("region_id")
    kinds = regions["image_path"].map(kind_of)
    confirmed = regions[kinds == reviewed.confirmed_kind]
    assert (confirmed["status"] == "confirmed").all() and (confirmed["class_name"] == reviewed.confirmed_kind).all()
    assert (confirmed["decided_by"] == REVIEWER).all() and (confirmed["source"] == "reviewer").all()
    rejected = regions[kinds == reviewed.rejected_kind]
    assert (rejected["status"] == "rejected").all() and (rejected["decided_by"] == "bo").all()
    assert rejected["class_id"].isna().all() and (rejected["class_name"] == "").all()
    dropped = regions.loc[reviewed.dropped_region]
    assert (dropped["status"], dropped["decided_by"]) == ("rejected", REVIEWER)
    stain = regions[kinds == "stain"]
    assert (stain["class_name"] == "blue stain").all() and (stain["status"] == "known").all()
    assert (stain["decided_by"] == "model").all(), "a rename changes the class, not who assigned its regions"
    assert snapshot.counts() == {"known": 23, "confirmed": 12, "proposed": 0, "unknown": 0, "rejected": 13}
    assert snapshot.last_decision.id == reviewed.last_decision and snapshot.last_decision.action == "rename"
    assert (regions["reflects_decision_id"] == reviewed.last_decision).all()
    sizes = loop.class_sizes()
    assert {c.name: c.regions for c in snapshot.classes} == {
        loop.classes[i].name: n for i, n in sizes.items()}


def test_outlier_scores_are_the_loops_leave_one_out_knn_scores(loop, reviewed):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    regions = snapshot.regions
    assert regions["outlier_score"].notna().all() and "k = 5" in snapshot.outlier_note
    loop.sync()
    embedding_ids = loop.mirror.embedding_id[regions["region_id"].to_numpy()]
    expected = loop.index.knn_outlier_scores(loop.embeddings.get(embedding_ids), 5, exclude_ids=embedding_ids)
    np.testing.assert_allclose(regions["outlier_score"], expected, atol=1e-6)
    members = regions["status"].isin(["known", "confirmed"])
    assert regions.loc[~members, "outlier_score"].mean() > regions.loc[members, "outlier_score"].mean()


def test_outlier_scores_stay_empty_without_embeddings_or_enough_references(tmp_path):
    ids = np.arange(4)
    scores, note = knn_outlier_scores(None, ids, np.ones(4, bool), k=5)
    assert np.isnan(scores).all() and "embeddings file" in note
    embeddings = EmbeddingFile(tmp_path / "e.f32", 3)
    embeddings.append(np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    scores, note = knn_outlier_scores(embeddings, ids, np.ones(4, bool), k=5)
    assert np.isnan(scores).all() and "at least k + 1 = 6" in note


def test_classes_carry_six_representatives_of_their_own_members(loop, reviewed):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    regions = snapshot.regions
    for defect_class in snapshot.classes:
        members = set(regions.loc[regions["class_id"] == defect_class.id, "region_id"])
        assert len(defect_class.representatives) == min(6, len(members))
        assert set(defect_class.representatives) <= members


def test_the_csv_has_one_row_per_region_and_iso_times(loop, reviewed):
    text = regions_csv(read_snapshot(loop.store, loop.embeddings).regions).decode()
    lines = text.splitlines()
    assert lines[0].split(",") == list(REGION_COLUMNS) and len(lines) == 49
    assert "+00:00" in lines[1] and "nan" not in text.lower()
