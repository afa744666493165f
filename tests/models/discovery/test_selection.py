import numpy as np
import pytest

from anomaly_discovery.models.discovery.selection import novel_silhouette, selection_score


def test_selection_score_reads_base_accuracy_and_clipped_silhouette():
    assert selection_score(0.8, 0.4) == pytest.approx(0.6)
    assert selection_score(None, -0.3) == 0.0
    assert selection_score(0.5, None) == 0.5
    assert selection_score(None, None) == 0.0


def test_silhouette_is_high_for_separated_directions_and_low_for_noise():
    rng = np.random.default_rng(0)
    directions = np.eye(8)[:3] * 5.0
    separated = np.concatenate([d + 0.1 * rng.normal(size=(30, 8)) for d in directions])
    noise = rng.normal(size=(90, 8))
    assert novel_silhouette(separated, "auto", k_max=6, seed=0) > 0.8
    assert novel_silhouette(noise, "auto", k_max=6, seed=0) < 0.3


def test_silhouette_is_none_when_no_cluster_count_fits():
    assert novel_silhouette(np.ones((2, 4)), 3, k_max=6, seed=0) is None
