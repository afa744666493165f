import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from anomaly_discovery.models.discovery.frozen import WEIGHT_GRID, joined_span, select_view_weights
from anomaly_discovery.models.discovery.views import combine_views, unit_rows


def three_views(n: int, dims: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit rows of three views of n points in three groups (the groups plain in the region view only)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) % 3
    centres = rng.normal(size=(3, dims)) * 3
    return {"region": unit_rows(centres[groups] + rng.normal(size=(n, dims))),
            "crop": unit_rows(rng.normal(size=(n, dims))), "image": unit_rows(rng.normal(size=(n, dims)))}


@pytest.mark.parametrize("weights", [{"region": 0.5, "crop": 0.25, "image": 0.25},
                                     {"region": 0.0, "crop": 0.75, "image": 0.25},
                                     {"region": 1.0, "crop": 0.0, "image": 0.0}])
def test_the_joined_span_keeps_every_cosine_of_the_joined_views(weights):
    vectors = three_views(20, 16)
    vectors["crop"][3] = 0  # a row with nothing in one view: the join scales it back to unit length
    grams = {name: v.astype(np.float64) @ v.T for name, v in vectors.items()}
    joined = combine_views(vectors, weights)
    span = joined_span(grams, weights)
    assert span.shape == (20, 20)
    np.testing.assert_allclose(span @ span.T, joined @ joined.T, atol=1e-5)


def test_view_weights_score_each_weighting_as_k_means_on_the_joined_views_would():
    vectors = three_views(30, 12)  # 30 regions, 36 dimensions: clustered in their span
    weights, silhouettes = select_view_weights(vectors, 3)
    assert weights == {"region": 1.0, "crop": 0.0, "image": 0.0}
    for grid in WEIGHT_GRID:
        joined = combine_views(vectors, grid)
        labels = KMeans(3, n_init=10, random_state=0).fit(joined).labels_
        key = ":".join(f"{grid[v]:.2f}" for v in ("region", "crop", "image"))
        assert silhouettes[key] == pytest.approx(silhouette_score(joined, labels, metric="cosine"), abs=1e-4)
    many = {name: np.concatenate([v, v[:15]]) for name, v in three_views(30, 5).items()}  # 45 regions, 15 dims
    assert select_view_weights(many, 3)[0] == {"region": 1.0, "crop": 0.0, "image": 0.0}
