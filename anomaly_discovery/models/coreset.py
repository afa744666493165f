"""Greedy (k-center) coreset subsampling, the step PatchCore uses to shrink its memory bank.

PatchCore (Roth et al., CVPR 2022, Alg. 1): start from one point, then repeatedly add the point farthest
from everything chosen so far, m* = argmax_{m ∈ M \\ C} min_{n ∈ C} ‖ψ(m) − ψ(n)‖₂, where ψ is a fixed
random linear projection (Johnson–Lindenstrauss) that makes the distances cheap to compute.

The selection here is exactly that greedy, made fast by the triangle inequality: every point remembers its
nearest chosen centre a, and each centre the largest distance R_a of its points. A new centre c can only
move a point of cluster a when d(c, a) < 2·R_a, so all other clusters are skipped. Late in the selection
most clusters are small and far apart, and an iteration touches few points; while most points are still
reachable, one pass over all of them is cheaper and is used instead.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

DENSE_FRACTION = 0.25  # above this share of candidate points one pass over all points is cheaper
PRUNING_SLACK = 1e-4  # relative to the largest point norm: covers float error in the centre gaps


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Project N×D features to N×dim with a fixed seeded Gaussian matrix scaled by 1/√dim (JL lemma).

    Features that already have at most ``dim`` channels are returned unchanged.
    """
    if features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(device=features.device, dtype=features.dtype)


def coreset_size(n_points: int, ratio: float) -> int:
    """How many points a coreset of ``ratio`` keeps: at least one, at most all."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset_ratio must be in (0, 1], got {ratio}")
    return min(n_points, max(1, round(ratio * n_points)))


def greedy_coreset_indices(features: torch.Tensor, size: int, projection_dim: int | None = 128,
                           seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Indices (in selection order) of ``size`` points of N×D ``features`` picked by greedy k-center.

    The first point is drawn with ``seed``; every later one is the point farthest (in the projected space)
    from the points already picked.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected a non-empty N×D feature matrix, got shape {tuple(features.shape)}")
    n_points = features.shape[0]
    if not 1 <= size <= n_points:
        raise ValueError(f"coreset size must be in [1, {n_points}], got {size}")
    points = features.float()
    if projection_dim is not None:
        points = random_projection(points, projection_dim, seed)
    device = points.device
    point_sq = points.pow(2).sum(1)
    slack = PRUNING_SLACK * float(point_sq.max().sqrt()) + 1e-12
    new = int(torch.randint(n_points, (1,), generator=torch.Generator().manual_seed(seed)))

    chosen = torch.empty(size, dtype=torch.long, device=device)
    centres = torch.empty(size, points.shape[1], dtype=points.dtype, device=device)
    radius_sq = torch.zeros(size, dtype=points.dtype, device=device)  # per cluster: max squared distance
    counts = torch.zeros(size, dtype=torch.long, device=device)  # per cluster: number of points
    cluster = torch.zeros(n_points, dtype=torch.long, device=device)  # each point's nearest chosen centre
    min_sq = torch.full((n_points,), float("inf"), dtype=points.dtype, device=device)
    for step in tqdm(range(size), desc="coreset", unit="pt", disable=not progress, leave=False, mininterval=0.5):
        centre = points[new]
        chosen[step], centres[step] = new, centre
        reachable = torch.ones(step, dtype=torch.bool, device=device)
        if step > 0:
            gap_sq = point_sq.index_select(0, chosen[:step]) + point_sq[new] - 2.0 * torch.mv(centres[:step], centre)
            reachable = gap_sq.clamp_(min=0.0).sqrt_() < 2.0 * radius_sq[:step].sqrt() + slack
        dense = step == 0 or int(counts[:step][reachable].sum()) > DENSE_FRACTION * n_points
        candidates = None if dense else torch.nonzero(reachable.index_select(0, cluster)).squeeze(1)
        dist_sq = _squared_distances(points if dense else points.index_select(0, candidates),
                                     point_sq if dense else point_sq.index_select(0, candidates), centre,
                                     point_sq[new])
        closer = dist_sq < (min_sq if dense else min_sq.index_select(0, candidates))
        moved = torch.nonzero(closer).squeeze(1) if dense else candidates[closer]
        counts.index_add_(0, cluster.index_select(0, moved), torch.full_like(moved, -1))
        counts[step] += moved.numel()
        cluster[moved] = step
        min_sq[moved] = dist_sq[closer]
        min_sq[new] = 0.0
        # Exact radii for every cluster that may have changed (all their points are candidates when sparse).
        if dense:
            radius_sq.zero_().scatter_reduce_(0, cluster, min_sq, reduce="amax")
        else:
            radius_sq[:step][reachable] = 0.0
            radius_sq.scatter_reduce_(0, cluster.index_select(0, candidates), min_sq.index_select(0, candidates),
                                      reduce="amax")
        new = int(torch.argmax(min_sq))
    return chosen


def _squared_distances(points: torch.Tensor, point_sq: torch.Tensor, centre: torch.Tensor,
                       centre_sq: torch.Tensor) -> torch.Tensor:
    """‖x − c‖² for every row x, as ‖x‖² + ‖c‖² − 2x·c: one pass over the points."""
    return (point_sq + centre_sq - 2.0 * torch.mv(points, centre)).clamp_(min=0.0)
