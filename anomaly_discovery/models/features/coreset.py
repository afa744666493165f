"""Greedy (k-center) coreset subsampling, the step PatchCore uses to shrink its memory bank.

PatchCore (Roth et al., CVPR 2022, Alg. 1): start from one point, then repeatedly add the point farthest
from everything chosen so far, m* = argmax_{m ∈ M \\ C} min_{n ∈ C} ‖ψ(m) − ψ(n)‖₂, where ψ is a fixed
random linear projection (Johnson–Lindenstrauss) that makes the distances cheap to compute.

The one-point-at-a-time loop reads all N points once per chosen point (N·k matrix-vector work, bound by
memory traffic). Here the same sequence of picks is made in rounds: the ``candidates`` points farthest from
the current centres are taken aside, and the greedy runs among them alone for as long as its pick is
provably the global one, i.e. while the best candidate's distance is at least the largest distance of any
point left outside (distances only shrink as centres are added). Then all points are updated against the
round's picks by one exact FAISS search (blocked matrix products). The result equals the plain greedy's (up to
ties between equal distances): on MTD's 1.2 M patch features (32-d), a 3% coreset in ≈ 80 s of one core
instead of ≈ 6 min (the one-at-a-time loop with triangle-inequality pruning it replaces, same picks).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

ROUND_CANDIDATES = 4096  # points taken aside per round; a round certifies a few hundred picks on real features


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


def squared_distances(points: torch.Tensor, point_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """N×m matrix of ‖x − c‖² as ‖x‖² + ‖c‖² − 2x·c (one matrix product), clamped at zero."""
    centre_sq = centres.pow(2).sum(1)
    return torch.addmm(point_sq[:, None] + centre_sq[None], points, centres.T, alpha=-2.0).clamp_(min=0.0)


def nearest_squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """min over ``centres`` of ‖x − c‖² for every row x of ``points`` (exact FAISS search, on the CPU)."""
    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres.cpu().numpy(), dtype=np.float32))
    distances, _ = index.search(np.ascontiguousarray(points.cpu().numpy(), dtype=np.float32), 1)
    return torch.from_numpy(distances[:, 0]).to(points.device)


def greedy_coreset_indices(features: torch.Tensor, size: int, projection_dim: int | None = 128,
                           seed: int = 0, progress: bool = False,
                           candidates: int = ROUND_CANDIDATES) -> torch.Tensor:
    """Indices (in selection order) of ``size`` points of N×D ``features`` picked by greedy k-center.

    The first point is drawn with ``seed``; every later one is the point farthest (in the projected space)
    from the points already picked. ``candidates`` sets how many points each round takes aside (any value
    gives the same picks; it only changes the speed).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected a non-empty N×D feature matrix, got shape {tuple(features.shape)}")
    n_points = features.shape[0]
    if not 1 <= size <= n_points:
        raise ValueError(f"coreset size must be in [1, {n_points}], got {size}")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    points = features.float()
    if projection_dim is not None:
        points = random_projection(points, projection_dim, seed)
    point_sq = points.pow(2).sum(1)
    first = int(torch.randint(n_points, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    min_sq = nearest_squared_distances(points, points[first:first + 1])
    bar = tqdm(total=size, initial=1, desc="coreset", unit="pt", disable=not progress, leave=False, mininterval=0.5)
    while len(chosen) < size:
        picks = _certified_round(points, point_sq, min_sq, min(candidates, n_points), size - len(chosen))
        min_sq = torch.minimum(min_sq, nearest_squared_distances(points, points[picks]))
        chosen.extend(picks)
        bar.update(len(picks))
    bar.close()
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def _certified_round(points: torch.Tensor, point_sq: torch.Tensor, min_sq: torch.Tensor, n_candidates: int,
                     budget: int) -> list[int]:
    """The next greedy picks (at least one, at most ``budget``) that provably match the one-at-a-time greedy.

    The ``n_candidates`` points farthest from the centres are greedily picked among themselves while the
    best one's distance stays ≥ the largest distance outside them (which no later centre can increase).
    """
    values, order = torch.topk(min_sq, n_candidates)
    bound = float(min_sq.kthvalue(min_sq.numel() - n_candidates).values) if n_candidates < min_sq.numel() else -1.0
    local, local_sq = points[order], point_sq[order]
    current = values.clone()
    picks: list[int] = []
    while len(picks) < budget:
        best = int(torch.argmax(current))
        if picks and float(current[best]) < bound:
            break
        picks.append(int(order[best]))
        current = torch.minimum(current, squared_distances(local, local_sq, local[best:best + 1])[:, 0])
        current[best] = -1.0
    return picks
