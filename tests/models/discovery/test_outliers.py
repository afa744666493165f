import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.discovery.outliers import (DistanceOutlierScorer, OutlierThreshold, energy_score,
                                                         evaluate_outlier_scores, image_outlier_score,
                                                         knn_distance_score, local_outlier_factor_score,
                                                         max_logit_score, max_softmax_score)


@pytest.fixture
def logits():
    """Row 0 is a confident known crop, row 1 is ambiguous (cosine logits)."""
    return torch.tensor([[0.9, 0.1, 0.0], [0.3, 0.3, 0.3]])


def test_knn_distance_is_cosine_distance_to_kth_neighbour():
    references = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = np.array([[2.0, 0.0], [1.0, 1.0]])
    assert np.allclose(knn_distance_score(queries, references, k=1), [0.0, 1 - np.sqrt(0.5)], atol=1e-6)
    assert np.allclose(knn_distance_score(queries, references, k=2), [1.0, 1 - np.sqrt(0.5)], atol=1e-6)


def test_knn_distance_by_faiss_equals_a_brute_force_search_on_fixed_inputs():
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(50, 8)), rng.normal(size=(20, 8))
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    unit_references = references / np.linalg.norm(references, axis=1, keepdims=True)
    brute_force = 1.0 - np.sort(unit_queries @ unit_references.T, axis=1)[:, ::-1][:, 2]
    assert np.allclose(knn_distance_score(queries, references, k=3), brute_force, atol=1e-6)


def test_knn_distance_rejects_k_above_reference_count():
    with pytest.raises(ValueError, match="k must be"):
        knn_distance_score(np.ones((2, 3)), np.ones((2, 3)), k=3)


def test_knn_distance_leaves_out_the_rows_a_query_must_not_see():
    # rows 0 and 1 are two crops of one image (identical), row 2 another image's crop
    references = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    plain = knn_distance_score(references[:1], references, k=1)
    own_image_left_out = knn_distance_score(references[:2], references, k=1, excluded=[np.array([0, 1])] * 2)
    assert np.allclose(plain, [0.0]) and np.allclose(own_image_left_out, [0.4, 0.4], atol=1e-6)
    with pytest.raises(ValueError, match="references a query may see"):
        knn_distance_score(references[:2], references, k=2, excluded=[np.array([0, 1])] * 2)


def unit(points: np.ndarray) -> np.ndarray:
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_local_outlier_factor_equals_scikit_learns():
    rng = np.random.default_rng(0)
    references, queries = rng.normal(size=(120, 12)), rng.normal(size=(25, 12))
    theirs = -LocalOutlierFactor(n_neighbors=10, novelty=True, metric="cosine").fit(unit(references)).score_samples(
        unit(queries))
    np.testing.assert_allclose(local_outlier_factor_score(queries, references, k=10), theirs, rtol=1e-5)


def test_local_outlier_factor_reads_distance_against_the_spread_of_the_known_neighbours():
    """A tight class and a loose one: a crop just outside the tight class is nearer to its neighbours than the
    loose class's own members are to theirs, so the k-NN distance ranks it below them; the local outlier factor
    ranks it above every known member."""
    rng = np.random.default_rng(1)
    tight = unit(np.array([1.0, 0.0, 0.0]) + 0.01 * rng.normal(size=(60, 3)))
    loose = unit(np.array([0.0, 1.0, 0.0]) + 0.2 * rng.normal(size=(60, 3)))
    references = np.concatenate([tight, loose])
    members = np.concatenate([unit(np.array([1.0, 0.0, 0.0]) + 0.01 * rng.normal(size=(20, 3))),
                              unit(np.array([0.0, 1.0, 0.0]) + 0.2 * rng.normal(size=(20, 3)))])
    outsider = unit(np.array([[1.0, 0.15, 0.0]]))
    distance = knn_distance_score(np.concatenate([members, outsider]), references, k=1)
    factor = local_outlier_factor_score(np.concatenate([members, outsider]), references, k=10)
    assert distance[-1] < distance[:-1].max()
    assert factor[-1] > factor[:-1].max()
    assert np.median(factor[:-1]) == pytest.approx(1.0, abs=0.2)


def test_local_outlier_factor_leaves_out_the_rows_a_query_must_not_see_and_refuses_a_lone_reference():
    rng = np.random.default_rng(2)
    references = unit(rng.normal(size=(40, 6)))
    query = references[:1] + 1e-4
    assert local_outlier_factor_score(query, references, k=5)[0] < local_outlier_factor_score(
        query, references, k=5, excluded=[np.array([0])])[0]
    with pytest.raises(ValueError, match="a reference's other references"):
        local_outlier_factor_score(query, references[:1], k=1)


def test_distance_outlier_scorer_is_the_configured_score_with_k_capped():
    rng = np.random.default_rng(3)
    queries, references = rng.normal(size=(5, 4)), rng.normal(size=(8, 4))
    np.testing.assert_array_equal(DistanceOutlierScorer("knn", references, 50).score(queries),
                                  knn_distance_score(queries, references, k=8))
    lof = DistanceOutlierScorer("lof", references, 50)
    np.testing.assert_array_equal(lof.score(queries), local_outlier_factor_score(queries, references, k=7))
    np.testing.assert_array_equal(lof.score(queries[:2]), local_outlier_factor_score(queries[:2], references, k=7))
    own = [np.array([0, 1])] * 5
    np.testing.assert_array_equal(lof.score(queries, own),
                                  local_outlier_factor_score(queries, references, k=6, excluded=own))
    np.testing.assert_array_equal(DistanceOutlierScorer("lof", references[:1], 3).score(queries),
                                  knn_distance_score(queries, references[:1], k=1))  # one reference: no LOF
    with pytest.raises(ValueError, match="outlier score must be one of"):
        DistanceOutlierScorer("mahalanobis", references, 1)
    with pytest.raises(ValueError, match="outlier_score"):
        DiscoveryConfig.of(outlier_score="mahalanobis")


@pytest.mark.parametrize("score", [max_softmax_score, energy_score, max_logit_score])
def test_logit_scores_rank_the_ambiguous_crop_higher(score, logits):
    values = score(logits)
    assert values.shape == (2,) and values[1] > values[0]


def test_max_softmax_score_values(logits):
    expected = 1 - torch.softmax(logits.double() / 0.1, dim=1).max(dim=1).values
    assert np.allclose(max_softmax_score(logits, 0.1), expected.numpy())
    assert max_softmax_score(logits, 0.1)[1] == pytest.approx(2 / 3)


def test_energy_score_values(logits):
    assert energy_score(logits, 0.1)[1] == pytest.approx(-0.1 * (3.0 + np.log(3)))


def test_threshold_accepts_95_percent_of_known_scores():
    known = np.random.default_rng(1).normal(size=1000)
    threshold = OutlierThreshold(accept_rate=0.95).fit(known)
    accepted = 1 - threshold.is_outlier(known).mean()
    assert 0.95 <= accepted <= 0.951


def test_threshold_flags_scores_above_it():
    threshold = OutlierThreshold(accept_rate=0.8).fit(np.arange(10.0))
    assert threshold.threshold_ == 8.0
    assert threshold.is_outlier([7.0, 8.0, 8.5]).tolist() == [False, False, True]


def test_unfitted_threshold_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        OutlierThreshold().is_outlier([1.0])


@pytest.mark.parametrize(("aggregate", "expected"), [("max", {"a": 0.9, "b": 0.2}), ("mean", {"a": 0.6, "b": 0.2})])
def test_image_outlier_score_aggregates_regions(aggregate, expected):
    scores = image_outlier_score(["a", "b", "a"], [0.3, 0.2, 0.9], aggregate=aggregate)
    assert scores == pytest.approx(expected)


def test_separated_distributions_give_auroc_one_and_fpr95_zero():
    result = evaluate_outlier_scores(np.linspace(0, 1, 50), np.linspace(2, 3, 40))
    assert result == {"auroc": 1.0, "fpr95": 0.0}


def test_fpr95_counts_known_crops_above_the_95_percent_tpr_threshold():
    unseen = np.arange(1.0, 21.0)          # threshold flagging 19 of 20 (95%) is 2.0
    known = np.array([0.0, 0.5, 1.5, 2.5, 3.0])
    result = evaluate_outlier_scores(known, unseen)
    assert result["fpr95"] == pytest.approx(2 / 5)
    assert 0.5 < result["auroc"] < 1.0


def test_identical_distributions_give_auroc_one_half():
    scores = np.random.default_rng(2).normal(size=200)
    assert evaluate_outlier_scores(scores, scores)["auroc"] == pytest.approx(0.5)
