"""The FAISS prototype index: add/remove/search by id, k-NN outlier scores and their threshold, the approximate
index above the size threshold, and atomic persistence tagged with the model version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly_discovery.models.discovery.outliers import knn_distance_score
from anomaly_discovery.platform.storage.index import (IndexConfig, PrototypeIndex, fit_outlier_threshold,
                                                      read_index_metadata, sidecar_path)

DIM = 32


def clustered(rng: np.random.Generator, n_per_cluster: int, n_clusters: int = 8, noise: float = 0.35,
              centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around unit centres; returns (vectors, cluster labels)."""
    if centres is None:
        centres = rng.standard_normal((n_clusters, DIM)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(centres)), n_per_cluster)
    vectors = centres[labels] + noise * rng.standard_normal((len(labels), DIM)).astype(np.float32) / np.sqrt(DIM)
    return vectors.astype(np.float32), labels


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def members(rng) -> np.ndarray:
    return clustered(rng, 50)[0]


@pytest.fixture
def index(members) -> PrototypeIndex:
    index = PrototypeIndex(DIM)
    index.add(np.arange(len(members)) * 10, members)
    return index


def test_each_stored_vector_is_its_own_nearest_neighbour(index, members):
    similarities, ids = index.search(members, k=3)
    assert (ids[:, 0] == np.arange(len(members)) * 10).all()
    assert np.allclose(similarities[:, 0], 1.0, atol=1e-5)
    assert (np.diff(similarities, axis=1) <= 1e-6).all()


def test_vectors_are_stored_l2_normalised(index, members):
    stored = index.vectors([0, 10])
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-6)
    assert np.allclose(stored, unit(members[:2]), atol=1e-6)


def test_remove_drops_ids_and_keeps_the_rest_searchable(index, members):
    assert index.remove([0, 10, 123_456]) == 2
    assert index.count() == len(members) - 2 and index.index_type() == "flat"
    _, ids = index.search(members[:3], k=1)
    assert ids[0, 0] not in (0, 10) and ids[1, 0] not in (0, 10) and ids[2, 0] == 20
    index.add([0], members[:1])
    assert index.search(members[:1], k=1)[1][0, 0] == 0


def test_adding_a_present_id_is_refused_unless_replacing(index, members):
    with pytest.raises(ValueError, match=r"already in the index: \[10\]"):
        index.add([10], members[5:6])
    index.add([10], members[5:6], replace=True)
    assert index.count() == len(members)
    assert np.allclose(index.vectors([10]), unit(members[5:6]), atol=1e-6)


def test_bad_ids_and_vectors_are_refused_with_the_shape_named(index, members):
    with pytest.raises(ValueError, match=r"shape \(N, 32\), got \(3, 5\)"):
        index.add([1, 2, 3], np.ones((3, 5)))
    with pytest.raises(ValueError, match="non-zero"):
        index.add([1], np.zeros((1, DIM)))
    with pytest.raises(ValueError, match=r"repeat within one add: \[7\]"):
        index.add([7, 7], members[:2])
    with pytest.raises(ValueError, match="kind must be one of"):
        index.add([1], members[:1], kind="crop")
    with pytest.raises(KeyError, match="not in the index: \\[3\\]"):
        index.vectors([3])


def test_prototypes_live_in_their_own_id_space(index, members):
    prototypes = unit(members.reshape(8, 50, DIM).mean(axis=1))
    index.add(np.arange(8), prototypes, kind="prototype")
    assert index.count("prototype") == 8 and index.count("region") == len(members)
    _, nearest_class = index.search(members, k=1, kind="prototype")
    assert (nearest_class[:, 0] == np.repeat(np.arange(8), 50)).mean() > 0.95
    assert index.search(members[:1], k=1)[1][0, 0] == 0


def test_knn_outlier_score_is_the_kth_neighbour_cosine_distance(index, members, rng):
    queries = rng.standard_normal((20, DIM)).astype(np.float32)
    for k in (1, 5):
        assert np.allclose(index.knn_outlier_scores(queries, k=k), knn_distance_score(queries, members, k=k),
                           atol=1e-5)


def test_leave_one_out_scores_skip_the_query_itself(index, members):
    own_ids = np.arange(len(members)) * 10
    with_self = index.knn_outlier_scores(members, k=1)
    without_self = index.knn_outlier_scores(members, k=1, exclude_ids=own_ids)
    assert np.allclose(with_self, 0.0, atol=1e-5)
    assert np.allclose(without_self, knn_distance_score(members, members, k=2), atol=1e-5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 399\]"):
        index.knn_outlier_scores(members, k=400, exclude_ids=own_ids)


def test_threshold_accepts_95_percent_of_known_samples_and_flags_unseen_ones(rng):
    centres = unit(rng.standard_normal((9, DIM)).astype(np.float32))
    known, _ = clustered(rng, 200, centres=centres[:8])
    validation, _ = clustered(rng, 100, centres=centres[:8])
    unseen, _ = clustered(rng, 100, centres=centres[8:])
    index = PrototypeIndex(DIM)
    index.add(np.arange(len(known)), known)
    threshold = fit_outlier_threshold(index.knn_outlier_scores(validation, k=5), accept_rate=0.95)
    assert (index.knn_outlier_scores(validation, k=5) <= threshold).mean() >= 0.95
    assert (index.knn_outlier_scores(unseen, k=5) > threshold).mean() > 0.9


def test_fit_outlier_threshold_refuses_no_scores():
    with pytest.raises(ValueError, match="non-empty"):
        fit_outlier_threshold([])


def test_save_then_load_restores_vectors_ids_and_model_version(index, members, tmp_path):
    index.add([3], members[:1], kind="prototype")
    path = index.save(tmp_path / "index" / "prototypes.faiss", "v7", extra={"last_decision_id": 12})
    loaded, version = PrototypeIndex.load(path)
    assert version == "v7"
    assert (loaded.ids() == index.ids()).all() and loaded.ids("prototype").tolist() == [3]
    assert np.array_equal(loaded.search(members, k=2)[1], index.search(members, k=2)[1])
    metadata = read_index_metadata(path)
    assert metadata["counts"] == {"region": len(members), "prototype": 1}
    assert metadata["extra"] == {"last_decision_id": 12}
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["model_version"] == "v7" and sidecar["counts"]["region"] == len(members)


def test_a_crash_while_saving_leaves_the_previous_file_intact(index, members, tmp_path, monkeypatch):
    path = index.save(tmp_path / "prototypes.faiss", "v1")
    before = path.read_bytes()
    index.remove([0])

    def crash_midway(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        index.save(path, "v2")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prototypes.faiss", "prototypes.faiss.json"]
    loaded, version = PrototypeIndex.load(path)
    assert version == "v1" and loaded.count() == len(members)


def test_above_the_size_threshold_the_index_is_approximate_and_agrees_with_flat(rng):
    vectors, _ = clustered(rng, 400, n_clusters=10)
    queries, _ = clustered(rng, 20, n_clusters=10)
    ids = np.arange(len(vectors)) + 1000
    flat = PrototypeIndex(DIM, config=IndexConfig(approximate_above=100_000))
    approximate = PrototypeIndex(DIM, config=IndexConfig(approximate_above=2_000, nprobe=8))
    flat.add(ids, vectors)
    approximate.add(ids[:1500], vectors[:1500])
    assert approximate.index_type() == "flat"
    approximate.add(ids[1500:], vectors[1500:])
    assert approximate.index_type() == "ivf" and approximate.count() == len(vectors)
    agree = approximate.search(queries, k=1)[1][:, 0] == flat.search(queries, k=1)[1][:, 0]
    assert agree.mean() >= 0.9


def test_approximate_index_removes_ids_incrementally_and_round_trips(rng, tmp_path):
    vectors, _ = clustered(rng, 300, n_clusters=10)
    index = PrototypeIndex(DIM, config=IndexConfig(approximate_above=1_000, nprobe=8))
    index.add(np.arange(len(vectors)), vectors)
    assert index.remove(np.arange(0, 3000, 2)) == 1500
    assert index.count() == 1500 and index.index_type() == "ivf"
    _, ids = index.search(vectors[1::2][:50], k=1)
    assert (ids[:, 0] % 2 == 1).all()
    loaded, version = PrototypeIndex.load(index.save(tmp_path / "ivf.faiss", "v3"))
    assert version == "v3" and loaded.describe() == index.describe()
    assert np.array_equal(loaded.search(vectors[:50], k=3)[1], index.search(vectors[:50], k=3)[1])


def test_gpu_request_without_a_gpu_searches_on_the_cpu(members):
    import faiss

    index = PrototypeIndex(DIM, use_gpu=True)
    assert index.on_gpu == (faiss.get_num_gpus() > 0)
    index.add(np.arange(len(members)), members)
    assert index.search(members[:2], k=1)[1][:, 0].tolist() == [0, 1]
