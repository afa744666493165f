"""Losses of the discovery head (methods §1 step 6, AnomalyNCD; §2, ProtoGCD).

Conventions used by every function here:

* **Two views, concatenated.** Tensors "of views" hold 2B rows: rows ``0 … B-1`` are view 1 and rows
  ``B … 2B-1`` view 2 of the same B crops (the order of ``torch.cat([view1, view2])``).
* **Cosine logits.** Head logits are cosine similarities (``PrototypeHead.forward``); the temperature is
  applied here, never inside the head.
* **Columns.** ``0 … n_base-1`` are base classes, ``n_base …`` novel clusters; ``n_base`` is the "normal"
  cluster used by pseudo-label correction. ``labels == UNLABELLED`` (-1) marks a novel (unlabelled) crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from anomaly_discovery.models.discovery.prototypes import mask_base_columns

UNLABELLED = -1


def _split_views(views: torch.Tensor, name: str) -> int:
    """Validate a (2B, …) tensor of two concatenated views; return B."""
    if views.ndim < 1 or views.shape[0] % 2 != 0 or views.shape[0] == 0:
        raise ValueError(f"{name} must hold two concatenated views (2B rows), got shape {tuple(views.shape)}")
    return views.shape[0] // 2


def _log_softmax_without_self(similarity: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax of a square similarity matrix with the diagonal (self-pairs) excluded."""
    diagonal = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    return torch.log_softmax(similarity.masked_fill(diagonal, float("-inf")), dim=1)


def info_nce_loss(z_views: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_rep, InfoNCE / SimCLR over the 2B views (methods §1 step 6; τ = 1.0).

    With ẑ = z/‖z‖, s_ij = ẑ_iᵀẑ_j / τ and i⁺ the other view of sample i:
    ``L = −1/(2B) Σ_i log( exp(s_{i,i⁺}) / Σ_{a≠i} exp(s_ia) )``.
    """
    batch = _split_views(z_views, "z_views")
    z = F.normalize(z_views, dim=-1)
    log_prob = _log_softmax_without_self(z @ z.T / temperature)
    rows = torch.arange(2 * batch, device=z.device)
    positives = (rows + batch) % (2 * batch)
    return -log_prob[rows, positives].mean()


def supcon_loss(z_views: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """L_rep^l, supervised contrastive loss on labelled base crops (methods §1 step 6; τ = 0.07).

    For anchor i over the 2B views with P(i) = {p ≠ i : y_p = y_i} (always holds i's other view):
    ``L = −1/(2B) Σ_i 1/|P(i)| Σ_{p∈P(i)} log( exp(s_ip) / Σ_{a≠i} exp(s_ia) )``.
    """
    batch = _split_views(z_views, "z_views")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) for {2 * batch} view rows, got {tuple(labels.shape)}")
    z = F.normalize(z_views, dim=-1)
    log_prob = _log_softmax_without_self(z @ z.T / temperature)
    view_labels = labels.repeat(2)
    positive = view_labels[:, None] == view_labels[None, :]
    positive.fill_diagonal_(False)
    positive_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
    return -(positive_log_prob / positive.sum(dim=1)).mean()


def cross_entropy_base(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """L_cls^l = CE(softmax(logits/τ), y) on labelled base crops (methods §1 step 6); logits (N, K)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy_base expects logits (N, K) and labels (N,), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits / temperature, labels)


def teacher_temperature_schedule(
    epoch: int,
    n_epochs: int = 50,
    warmup_start: float = 0.07,
    warmup_end: float = 0.04,
    warmup_epochs: int | None = None,
    n_values: int = 10,
) -> float:
    """Teacher temperature τ_t of an epoch (methods §1 step 6), a staircase from ``warmup_start`` to ``warmup_end``.

    ``n_values`` values linearly spaced over the first ``warmup_epochs`` epochs (default 80% of
    ``n_epochs``), each held for ``warmup_epochs / n_values`` epochs, then ``warmup_end``. The defaults
    reproduce AnomalyNCD exactly (50 epochs: 10 values × 4 epochs, then 0.04 for epochs 40–49);
    ``n_values = warmup_epochs`` gives SimGCD's per-epoch linear warm-up.
    """
    if epoch < 0 or n_epochs < 1 or n_values < 1:
        raise ValueError(f"need epoch >= 0, n_epochs >= 1, n_values >= 1; got {epoch}, {n_epochs}, {n_values}")
    warmup = round(0.8 * n_epochs) if warmup_epochs is None else warmup_epochs
    if epoch >= warmup:
        return float(warmup_end)
    if n_values == 1:
        return float(warmup_start)
    step = min(n_values - 1, epoch * n_values // warmup)
    return float(warmup_start + (warmup_end - warmup_start) * step / (n_values - 1))


def novel_teacher_targets(
    logits_detached: torch.Tensor,
    n_base: int,
    teacher_temperature: float,
    region_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher targets for novel crops (methods §1 step 6), shape (N, K), no gradient.

    ``q = softmax(logits/τ_t)`` with the ``n_base`` base columns zeroed and renormalised. With
    ``region_scores`` s (the crop's max normalised anomaly score in [0, 1]), **pseudo-label correction**
    pulls weakly anomalous crops towards the "normal" cluster: ``q ← w·e + (1 − w)·q`` with
    ``w = max(0, 0.5 − s)`` and e one-hot at column ``n_base``. ``region_scores=None`` skips it.
    """
    logits = logits_detached.detach()
    targets = mask_base_columns(torch.softmax(logits / teacher_temperature, dim=-1), n_base)
    if region_scores is None:
        return targets
    scores = torch.as_tensor(region_scores, dtype=targets.dtype, device=targets.device)
    if scores.shape != (targets.shape[0],):
        raise ValueError(f"region_scores must have shape ({targets.shape[0]},), got {tuple(scores.shape)}")
    weight = (0.5 - scores).clamp_min(0.0)[:, None]
    normal = torch.zeros_like(targets)
    normal[:, n_base] = 1.0
    return weight * normal + (1.0 - weight) * targets


def cross_view_distillation(
    student_logits_views: torch.Tensor, teacher_targets_views: torch.Tensor, student_temperature: float = 0.1
) -> torch.Tensor:
    """L_cls^u, swapped-view self-distillation (methods §1 step 6; τ_s = 0.1).

    The teacher of view 1 supervises the student of view 2 and vice versa:
    ``L = −1/(2B) Σ_i Σ_c q_{swap(i),c} log softmax(l_i/τ_s)_c``.
    """
    batch = _split_views(student_logits_views, "student_logits_views")
    if teacher_targets_views.shape != student_logits_views.shape:
        raise ValueError(f"teacher_targets_views {tuple(teacher_targets_views.shape)} must match "
                         f"student_logits_views {tuple(student_logits_views.shape)}")
    swapped = teacher_targets_views.detach().roll(batch, dims=0)
    log_student = torch.log_softmax(student_logits_views / student_temperature, dim=-1)
    return -(swapped * log_student).sum(dim=-1).mean()


def mean_entropy_regulariser(probs: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_reg^u = KL(p̄ ‖ π) with p̄ = mean_i p_i over the batch (methods §1 step 6): with the uniform prior (the
    default) −H(p̄) + log K, the paper's term; ≥ 0, 0 when p̄ equals the prior. A non-uniform ``prior`` (K shares
    summing to 1) keeps every class in use without pulling unequal classes to equal sizes."""
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {tuple(probs.shape)}")
    mean_probs = probs.mean(dim=0)
    if prior is None:
        return (mean_probs * mean_probs.clamp_min(1e-12).log()).sum() + math.log(probs.shape[1])
    if prior.shape != mean_probs.shape or (prior <= 0).any() or abs(float(prior.sum()) - 1) > 1e-4:
        raise ValueError(f"prior must be {probs.shape[1]} positive shares summing to 1, got {prior.tolist()}")
    return (mean_probs * (mean_probs.clamp_min(1e-12).log() - prior.log())).sum()


def prototype_separation_loss(prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """L_sep (ProtoGCD, methods §2): ``mean_c log( mean_{c'≠c} exp(μ_cᵀμ_c' / τ) )``.

    ``prototypes`` is (K, D) or (H, K, D) (averaged over heads); rows are L2-normalised here. It is 0 for
    orthogonal prototypes and 1/τ when all coincide.
    """
    if prototypes.ndim not in (2, 3) or prototypes.shape[-2] < 2:
        raise ValueError(f"prototypes must be (K, D) or (H, K, D) with K >= 2, got {tuple(prototypes.shape)}")
    mu = F.normalize(prototypes, dim=-1)
    similarity = mu @ mu.transpose(-1, -2) / temperature
    n_classes = similarity.shape[-1]
    diagonal = torch.eye(n_classes, dtype=torch.bool, device=similarity.device)
    log_mean = torch.logsumexp(similarity.masked_fill(diagonal, float("-inf")), dim=-1) - math.log(n_classes - 1)
    return log_mean.mean()


def harden_confident_targets(targets: torch.Tensor, ratio: float) -> torch.Tensor:
    """ProtoGCD's adaptive pseudo-labels (methods §2): the ``ratio`` fraction of rows with the largest
    top-1/top-2 probability ratio get a one-hot target at their argmax; the other rows keep soft targets."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    n_hard = int(round(ratio * targets.shape[0]))
    if n_hard == 0:
        return targets
    top2 = targets.topk(min(2, targets.shape[1]), dim=-1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
    confidence = top2[:, 0] / second.clamp_min(1e-12)
    rows = confidence.argsort(descending=True)[:n_hard]
    hardened = targets.clone()
    hardened[rows] = F.one_hot(targets[rows].argmax(dim=-1), targets.shape[1]).to(targets.dtype)
    return hardened


def hard_label_ratio_schedule(epoch: int, n_epochs: int, start: float = 0.2, ramp_epochs: int | None = None) -> float:
    """Ratio r for ``harden_confident_targets``: linear from ``start`` to 1 over ``ramp_epochs`` (default
    half the epochs, ProtoGCD's 100 of 200), then 1."""
    ramp = max(1, n_epochs // 2 if ramp_epochs is None else ramp_epochs)
    return float(min(1.0, start + (1.0 - start) * epoch / ramp))


def adaptive_pseudo_label_distillation(
    student_logits_views: torch.Tensor,
    teacher_targets_views: torch.Tensor,
    ratio: float,
    student_temperature: float = 0.1,
) -> torch.Tensor:
    """ProtoGCD's adaptive pseudo-label distillation: ``cross_view_distillation`` against teacher targets
    whose top-``ratio`` most confident rows are hardened to one-hot (``harden_confident_targets``)."""
    hardened = harden_confident_targets(teacher_targets_views.detach(), ratio)
    return cross_view_distillation(student_logits_views, hardened, student_temperature)


@dataclass(frozen=True)
class DiscoveryLossWeights:
    """Weights of ``total_discovery_loss``: λ (supervised share), μ (entropy), ν (prototype separation).

    λ = 0.3 and μ = 4 are AnomalyNCD's; ν = 0.1 is the top of ProtoGCD's 0.05–0.1 range (0 turns L_sep off).
    """

    supervised: float = 0.3
    entropy: float = 4.0
    separation: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.supervised <= 1.0:
            raise ValueError(f"DiscoveryLossWeights.supervised (λ) must be in [0, 1], got {self.supervised}")
        if self.entropy < 0 or self.separation < 0:
            raise ValueError(f"entropy (μ) and separation (ν) weights must be >= 0, got {self.entropy}, "
                             f"{self.separation}")


def total_discovery_loss(
    projections: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_base: int,
    teacher_temperature: float,
    prototypes: torch.Tensor | None = None,
    region_scores: torch.Tensor | None = None,
    weights: DiscoveryLossWeights = DiscoveryLossWeights(),
    student_temperature: float = 0.1,
    pseudo_label_correction: bool = True,
    hard_label_ratio: float = 0.0,
) -> dict[str, torch.Tensor]:
    """``L = λ(L_rep^l + L_cls^l) + (1−λ)(L_rep + L_cls^u + μ·L_reg^u) + ν·L_sep`` (methods §1 step 6, §2).

    Inputs: ``projections`` (2B, D) projector outputs of both views; ``logits`` (H, 2B, K) cosine logits of
    every head; ``labels`` (B,) base class or ``UNLABELLED``; ``prototypes`` (H, K, D) for L_sep (None: no
    L_sep); ``region_scores`` (B,) crop anomaly scores for pseudo-label correction (used for novel crops
    when ``pseudo_label_correction``); ``hard_label_ratio`` > 0 adds ProtoGCD's hardening after PLC.
    Supervised parts use base crops, clustering parts novel crops (base columns masked in the teacher,
    students see every column); a part with no crops in the batch is 0, so batches without base or
    without novel crops work. Heads are averaged. Returns ``total`` (with graph) and detached parts:
    ``rep``, ``rep_base``, ``cls_base``, ``cls_novel``, ``reg_novel``, ``sep``, ``cluster_per_head``
    (H,) = L_cls^u + μ·L_reg^u per head (the head-selection criterion; 0 without novel crops) and
    ``n_novel`` (to weight ``cluster_per_head`` when averaging over an epoch).
    """
    batch = _split_views(projections, "projections")
    if logits.ndim != 3 or logits.shape[1] != 2 * batch:
        raise ValueError(f"logits must have shape (H, {2 * batch}, K), got {tuple(logits.shape)}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    n_heads, _, n_classes = logits.shape
    if not 0 <= n_base < n_classes:
        raise ValueError(f"n_base must be in [0, {n_classes - 1}] for {n_classes} classes, got {n_base}")
    if ((labels != UNLABELLED) & ((labels < 0) | (labels >= n_base))).any():
        raise ValueError(f"labels must be {UNLABELLED} (novel) or base classes in [0, {n_base - 1}], "
                         f"got {sorted(set(labels.tolist()))}")
    zero = projections.new_zeros(())
    is_base = labels != UNLABELLED
    base_rows, novel_rows = is_base.repeat(2), (~is_base).repeat(2)
    n_novel = int((~is_base).sum())

    rep = info_nce_loss(projections)
    rep_base, cls_base = zero, zero
    if is_base.any():
        base_labels = labels[is_base]
        rep_base = supcon_loss(projections[base_rows], base_labels)
        cls_base = torch.stack([cross_entropy_base(head[base_rows], base_labels.repeat(2), student_temperature)
                                for head in logits]).mean()

    cls_novel_heads = [zero] * n_heads
    reg_novel_heads = [zero] * n_heads
    if n_novel > 0:
        scores = None
        if pseudo_label_correction and region_scores is not None:
            if region_scores.shape != (batch,):
                raise ValueError(f"region_scores must have shape ({batch},), got {tuple(region_scores.shape)}")
            scores = region_scores[~is_base].repeat(2)
        for index, head in enumerate(logits):
            student = head[novel_rows]
            targets = novel_teacher_targets(student, n_base, teacher_temperature, scores)
            cls_novel_heads[index] = adaptive_pseudo_label_distillation(
                student, targets, hard_label_ratio, student_temperature)
            reg_novel_heads[index] = mean_entropy_regulariser(torch.softmax(student / student_temperature, dim=-1))
    cls_novel = torch.stack(cls_novel_heads).mean()
    reg_novel = torch.stack(reg_novel_heads).mean()
    sep = zero
    if prototypes is not None and weights.separation > 0:
        sep = prototype_separation_loss(prototypes)

    lam = weights.supervised
    total = (lam * (rep_base + cls_base) + (1 - lam) * (rep + cls_novel + weights.entropy * reg_novel)
             + weights.separation * sep)
    cluster_per_head = torch.stack([c + weights.entropy * r for c, r in zip(cls_novel_heads, reg_novel_heads)])
    return {
        "total": total,
        "rep": rep.detach(),
        "rep_base": rep_base.detach(),
        "cls_base": cls_base.detach(),
        "cls_novel": cls_novel.detach(),
        "reg_novel": reg_novel.detach(),
        "sep": sep.detach(),
        "cluster_per_head": cluster_per_head.detach(),
        "n_novel": torch.tensor(n_novel),
    }
