"""Discovery head: a projection MLP for the contrastive branch and multi-head cosine prototypes.

Methods §1 step 5 (AnomalyNCD head, as in UNO/SimGCD) and §2 (ProtoGCD prototypes):

* ``ProjectionHead``: MLP ``in_dim → hidden → … → bottleneck`` with GELU and no BatchNorm; its output
  z feeds InfoNCE / SupCon (the losses L2-normalise z themselves).
* ``PrototypeHead``: ``n_heads`` bias-free weight-normalised linear layers (each weight row scaled to unit
  norm, gain fixed at 1) applied to the L2-normalised feature x̂. Its logits are **cosine similarities**
  ``μ_cᵀ x̂ ∈ [-1, 1]``, *not* divided by the temperature: every loss and score that consumes them
  takes the temperature as an argument (τ = 0.1 by default, i.e. the vMF concentration 1/τ = 10 with
  ``p(c | x) ∝ exp(μ_cᵀ x̂ / τ)``).

Columns ``0 … n_base-1`` are the labelled base classes, ``n_base … n_classes-1`` the novel clusters.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """MLP projector with ``n_layers`` linear layers and GELU between them (no BatchNorm).

    ``n_layers=3`` gives AnomalyNCD's ``in_dim → 2048 → 2048 → 256``; ``n_layers=1`` is a single linear map.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim),
                            ("n_layers", n_layers)):
            if value < 1:
                raise ValueError(f"ProjectionHead: {name} must be >= 1, got {value}")
        widths = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) → (B, bottleneck_dim), not normalised."""
        return self.mlp(features)


def mask_base_columns(probs: torch.Tensor, n_base: int) -> torch.Tensor:
    """Zero the ``n_base`` base-class columns of (…, K) probabilities and renormalise over the novel ones."""
    n_classes = probs.shape[-1]
    if not 0 <= n_base < n_classes:
        raise ValueError(f"n_base must be in [0, {n_classes - 1}] for {n_classes} columns, got {n_base}")
    novel = probs.clone()
    novel[..., :n_base] = 0.0
    return novel / novel.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(novel.dtype).tiny)


def select_best_head(cluster_losses: Sequence[float] | torch.Tensor) -> int:
    """Index of the head with the lowest mean cluster loss (methods §1 step 7); NaN losses never win."""
    losses = torch.as_tensor(cluster_losses, dtype=torch.float64).flatten()
    if losses.numel() == 0:
        raise ValueError("select_best_head: cluster_losses is empty")
    if torch.isnan(losses).all():
        raise ValueError(f"select_best_head: every cluster loss is NaN: {losses.tolist()}")
    return int(torch.nan_to_num(losses, nan=float("inf")).argmin())


class PrototypeHead(nn.Module):
    """``n_heads`` sets of unit-norm prototypes; ``forward`` returns cosine logits (n_heads, B, n_classes).

    The best head (``select_best_head``) is kept in the ``best_head`` buffer so it is saved with the
    ``state_dict``; ``head_logits`` / ``probabilities`` use it by default.
    """

    def __init__(self, in_dim: int, n_classes: int, n_heads: int = 4, temperature: float = 0.1):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("n_classes", n_classes), ("n_heads", n_heads)):
            if value < 1:
                raise ValueError(f"PrototypeHead: {name} must be >= 1, got {value}")
        if temperature <= 0:
            raise ValueError(f"PrototypeHead: temperature must be > 0, got {temperature}")
        self.n_heads = n_heads
        self.n_classes = n_classes
        self.temperature = temperature
        self.weight = nn.Parameter(F.normalize(torch.randn(n_heads, n_classes, in_dim), dim=-1))
        self.register_buffer("best_head", torch.tensor(0, dtype=torch.long))

    def prototypes(self) -> torch.Tensor:
        """Unit-norm prototypes μ, shape (n_heads, n_classes, in_dim); differentiable (L_sep uses it)."""
        return F.normalize(self.weight, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) features → cosine logits μ_cᵀ x̂ of every head, shape (n_heads, B, n_classes)."""
        if features.ndim != 2 or features.shape[1] != self.weight.shape[-1]:
            raise ValueError(f"PrototypeHead expects features of shape (B, {self.weight.shape[-1]}), "
                             f"got {tuple(features.shape)}")
        return torch.einsum("bd,hkd->hbk", F.normalize(features, dim=-1), self.prototypes())

    def head_logits(self, features: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """Cosine logits (B, n_classes) of one head (default: the selected best head)."""
        index = int(self.best_head) if head is None else head
        if not 0 <= index < self.n_heads:
            raise ValueError(f"head must be in [0, {self.n_heads - 1}], got {index}")
        prototypes = F.normalize(self.weight[index], dim=-1)
        return F.normalize(features, dim=-1) @ prototypes.T

    def probabilities(self, features: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """p(c | x) = softmax_c(μ_cᵀ x̂ / τ) of one head (default: the best head), shape (B, n_classes)."""
        return torch.softmax(self.head_logits(features, head) / self.temperature, dim=-1)

    def select_best_head(self, cluster_losses: Sequence[float] | torch.Tensor) -> int:
        """Store and return the head with the lowest mean cluster loss; needs one loss per head."""
        losses = torch.as_tensor(cluster_losses).flatten()
        if losses.numel() != self.n_heads:
            raise ValueError(f"cluster_losses must have one value per head ({self.n_heads}), got {losses.numel()}")
        index = select_best_head(losses)
        self.best_head.fill_(index)
        return index
