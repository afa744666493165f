import pytest
import torch

from anomaly_discovery.models.features.coreset import coreset_size, greedy_coreset_indices, random_projection


@pytest.fixture
def clustered_points() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(20, 16, generator=generator)
    labels = torch.randint(20, (3000,), generator=generator)
    return centres[labels] + torch.randn(3000, 16, generator=generator)


def test_each_pick_is_the_point_farthest_from_earlier_picks(clustered_points):
    picks = greedy_coreset_indices(clustered_points, 60, projection_dim=None)
    nearest = torch.cdist(clustered_points, clustered_points[picks[:1]]).squeeze(1)
    for pick in picks[1:]:
        assert nearest[pick] >= nearest.max() - 1e-4
        nearest = torch.minimum(nearest, (clustered_points - clustered_points[pick]).norm(dim=1))


def test_picks_are_distinct_and_cover_the_set_better_than_random_picks(clustered_points):
    picks = greedy_coreset_indices(clustered_points, 40, projection_dim=None)
    random_picks = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:40]
    assert len(set(picks.tolist())) == 40

    def covering_radius(chosen):
        return torch.cdist(clustered_points, clustered_points[chosen]).amin(1).max()

    assert covering_radius(picks) < 0.8 * covering_radius(random_picks)


def test_same_seed_same_picks_other_seed_other_start(clustered_points):
    first = greedy_coreset_indices(clustered_points, 10, seed=3)
    assert torch.equal(first, greedy_coreset_indices(clustered_points, 10, seed=3))
    assert first[0] != greedy_coreset_indices(clustered_points, 10, seed=4)[0]


def test_random_projection_keeps_distances_roughly():
    points = torch.randn(50, 512, generator=torch.Generator().manual_seed(1))
    projected = random_projection(points, 128, seed=0)
    assert projected.shape == (50, 128)
    ratio = torch.pdist(projected) / torch.pdist(points)
    assert 0.7 < ratio.min() and ratio.max() < 1.3
    assert torch.equal(random_projection(points[:, :64], 128), points[:, :64])


def test_coreset_size_is_the_ratio_of_the_bank():
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(5, 0.01) == 1
    assert coreset_size(7, 1.0) == 7


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match=f"coreset_ratio must be in \\(0, 1\\], got {ratio}"):
        coreset_size(10, ratio)


def test_bad_feature_matrix_is_refused():
    with pytest.raises(ValueError, match=r"shape \(4, 2, 3\)"):
        greedy_coreset_indices(torch.zeros(4, 2, 3), 2)
    with pytest.raises(ValueError, match=r"coreset size must be in \[1, 4\], got 9"):
        greedy_coreset_indices(torch.zeros(4, 3), 9)


def test_greedy_runs_in_the_projected_space(clustered_points):
    wide = torch.cat([clustered_points, clustered_points.flip(1)], dim=1)  # 32-d, projected to 8-d
    picks = greedy_coreset_indices(wide, 30, projection_dim=8, seed=2)
    projected = random_projection(wide, 8, seed=2)
    nearest = (projected - projected[picks[0]]).norm(dim=1)
    for pick in picks[1:]:
        assert nearest[pick] >= nearest.max() - 1e-4
        nearest = torch.minimum(nearest, (projected - projected[pick]).norm(dim=1))


@pytest.mark.parametrize("candidates", [1, 7, 64, 3000])
def test_rounds_of_any_size_make_the_one_at_a_time_greedy_picks(clustered_points, candidates):
    reference = greedy_coreset_indices(clustered_points, 300, projection_dim=None, candidates=1)
    picks = greedy_coreset_indices(clustered_points, 300, projection_dim=None, candidates=candidates)
    assert torch.equal(picks, reference)


def test_a_bad_candidate_count_is_refused(clustered_points):
    with pytest.raises(ValueError, match="candidates must be at least 1, got 0"):
        greedy_coreset_indices(clustered_points, 5, candidates=0)
