"""Greedy (k-center) coreset subsampling, the step PatchCore uses to shrink its memory bank.

PatchCore (Roth et al., CVPR 2022, Alg. 1): start from one point, then repeatedly add the point farthest
from everything chosen so far, m* = argmax_{m ∈ M \\ C} min_{n ∈ C} ‖ψ(m) − ψ(n)‖₂, where ψ is a fixed
random linear projection (Johnson–Lindenstrauss) that makes the distances cheap to compute.

The selection here is exactly that greedy, made fast by the triangle inequality: every point x remembers
its nearest chosen centre a, and a new centre c can only come closer to x when d(c, a) < 2·d(x, a), so the
distance to c is computed only for those points. Late in the selection centres are close to their points
and an iteration touches few of them; while many points qualify, one pass over all of them is cheaper.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

DENSE_FRACTION = 0.25  # above this share of candidates, one pass over all points is cheaper than gathering
PRUNING_SLACK = 1e-4  # relative to the largest point norm: covers float error in the centre distances


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
    cluster = torch.zeros(n_points, dtype=torch.long, device=device)  # each point's nearest chosen centre
    min_sq = torch.full((n_points,), float("inf"), dtype=points.dtype, device=device)
    for step in tqdm(range(size), desc="coreset", unit="pt", disable=not progress, leave=False, mininterval=0.5):
        centre = points[new]
        chosen[step], centres[step] = new, centre
        candidates = None
        if step > 0:
            # x (nearest centre a) can only get closer to c when ‖c − a‖ < 2‖x − a‖ (triangle inequality).
            gap_sq = point_sq.index_select(0, chosen[:step]) + point_sq[new] - 2.0 * torch.mv(centres[:step], centre)
            reach_sq = (gap_sq.clamp_(min=0.0).sqrt_() - slack).clamp_(min=0.0).pow_(2)
            candidates = torch.nonzero(reach_sq.index_select(0, cluster) < 4.0 * min_sq).squeeze(1)
            if candidates.numel() > DENSE_FRACTION * n_points:
                candidates = None
        if candidates is None:
            dist_sq = _squared_distances(points, point_sq, centre, point_sq[new])
            closer = dist_sq < min_sq
            moved = torch.nonzero(closer).squeeze(1)
        else:
            dist_sq = _squared_distances(points.index_select(0, candidates), point_sq.index_select(0, candidates),
                                         centre, point_sq[new])
            closer = dist_sq < min_sq.index_select(0, candidates)
            moved = candidates[closer]
        cluster[moved] = step
        min_sq[moved] = dist_sq[closer]
        min_sq[new] = 0.0
        new = int(torch.argmax(min_sq))
    return chosen


def _squared_distances(points: torch.Tensor, point_sq: torch.Tensor, centre: torch.Tensor,
                       centre_sq: torch.Tensor) -> torch.Tensor:
    """‖x − c‖² for every row x, as ‖x‖² + ‖c‖² − 2x·c: one pass over the points."""
    return (point_sq + centre_sq - 2.0 * torch.mv(points, centre)).clamp_(min=0.0)
