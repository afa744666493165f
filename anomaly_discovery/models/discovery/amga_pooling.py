"""The learned discovery model over frozen views (issue 14 item 2; methods.md §1 step 4, §2 steps 3–5, §5).

Anomaly-Map-Guided Attention does the pooling: at every depth t of the frozen backbone a query q_t attends over
the crop's feature map with the keys W_t f_j and the Region Guidance Factor's bias b_j added to every logit,

    α_j = softmax_j(b_j + q_t · W_t f_j / √d),    region_t = Σ_j α_j f_j,

(the CLS row of AMGA with the CLS token reduced to its query). q_t starts at zero, so the untrained model pools
exactly as the floor does (softmax(b)), and the RGF's factors (ρ_obj, ρ_bg, γ) are learnable. The pooled depths, the
crop's and the whole image's vectors go through the floor's nuisance projection and view weights, and the unit
embedding meets cosine prototypes of the known (base) classes and K novel classes (τ = 0.1, ProtoGCD's vMF head).
The novel prototypes start at the floor's k-means centres, the base ones at the base classes' mean embeddings:
before training, the model's assignments are the floor's. With ``adapter_width`` > 0 a residual adapter (methods.md
§5) moves the whole embedding, e ← (e + A(e)) / ‖·‖, A a two-layer MLP whose last layer starts at zero, so that
training can also move the crop and whole-image views, which AMGA's pooling does not touch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .amga import RegionGuidanceFactor
from .views import VIEW_NAMES, NuisanceProjection

KEY_DIM = 16


class GuidedAttentionPooling(nn.Module):
    """One depth's AMGA pooling: the RGF bias (the model's, shared by every depth) plus a zero-initialised query
    over projected keys."""

    def __init__(self, channels: int, key_dim: int = KEY_DIM):
        super().__init__()
        self.keys = nn.Linear(channels, key_dim, bias=False)
        self.query = nn.Parameter(torch.zeros(key_dim))
        self.scale = 1.0 / math.sqrt(key_dim)

    def forward(self, maps: torch.Tensor, anomaly: torch.Tensor, objects: torch.Tensor,
                guidance: RegionGuidanceFactor) -> torch.Tensor:
        """B×C×h×w maps, B×1×h×w anomaly and object maps (pooled to the grid) → B×C."""
        features = maps.flatten(2).transpose(1, 2).float()
        key_query = self.keys.weight.T @ self.query  # q · W f_j = f_j · (Wᵀq): one C-vector, not B×P keys
        logits = guidance(anomaly, objects, maps.shape[-2:]) + features @ key_query * self.scale
        return torch.einsum("bp,bpc->bc", torch.softmax(logits, dim=1), features)


class ResidualAdapter(nn.Module):
    """x ↦ W₂ GELU(W₁ x), W₂ and its bias zero at the start: added to an embedding, it leaves it as it was."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.hidden = nn.Linear(dim, width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(x)))


class ViewDiscoveryModel(nn.Module):
    """Guided pooling of every depth → projected, weighted views → unit embedding (→ residual adapter) → cosine
    prototypes."""

    def __init__(self, tap_channels: Sequence[int], view_weights: dict[str, float],
                 projection: Optional[NuisanceProjection], n_classes: int, temperature: float = 0.1,
                 adapter_width: int = 0):
        super().__init__()
        self.guidance = RegionGuidanceFactor("amga", learnable=True)
        self.pools = nn.ModuleList(GuidedAttentionPooling(c) for c in tap_channels)
        self.register_buffer("view_scale", torch.tensor([math.sqrt(view_weights[v]) for v in VIEW_NAMES]))
        self.temperature = temperature
        entries = tap_channels if projection is None else [*tap_channels, tap_channels[-1]][:len(projection.means)]
        for depth, channels in enumerate(entries):  # one more than the depths: the turned image view's own
            mean = torch.zeros(channels) if projection is None else torch.from_numpy(projection.means[depth])
            basis = (torch.zeros(0, channels) if projection is None
                     else torch.from_numpy(projection.components[depth]))
            self.register_buffer(f"mean_{depth}", mean.float())
            self.register_buffer(f"basis_{depth}", basis.float())
        self.image_entry = len(entries) - 1
        dim = self.embedding_dim(tap_channels, view_weights)
        self.prototypes = nn.Parameter(torch.zeros(n_classes, dim))
        self.adapter_width = adapter_width
        self.adapter = ResidualAdapter(dim, adapter_width) if adapter_width else None

    @classmethod
    def with_shapes(cls, tap_channels: Sequence[int], view_weights: dict[str, float], components: Sequence[int],
                    n_classes: int, temperature: float = 0.1, adapter_width: int = 0) -> "ViewDiscoveryModel":
        """An empty model of the given nuisance-basis sizes per depth (and the turned image view's, when one more),
        for loading saved weights into."""
        entries = [*tap_channels, tap_channels[-1]][:len(components)]
        projection = NuisanceProjection([np.zeros(c, np.float32) for c in entries],
                                        [np.zeros((n, c), np.float32) for n, c in zip(components, entries)])
        return cls(tap_channels, view_weights, projection, n_classes, temperature, adapter_width)

    def projection_components(self) -> list[int]:
        return [getattr(self, f"basis_{d}").shape[0] for d in range(self.image_entry + 1)]

    @staticmethod
    def embedding_dim(tap_channels: Sequence[int], view_weights: dict[str, float]) -> int:
        widths = {"region": sum(tap_channels), "crop": tap_channels[-1], "image": tap_channels[-1]}
        return sum(widths[v] for v in VIEW_NAMES if view_weights[v] > 0)

    def project(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        centred = features - getattr(self, f"mean_{depth}")
        basis = getattr(self, f"basis_{depth}")
        return centred - (centred @ basis.T) @ basis if basis.numel() else centred

    def embed(self, maps: Sequence[torch.Tensor], anomaly: Sequence[torch.Tensor], objects: Sequence[torch.Tensor],
              image: torch.Tensor) -> torch.Tensor:
        """Unit embeddings from a batch's cached depth maps (with their pooled anomaly and object maps) and the
        raw whole-image vectors."""
        last = len(maps) - 1
        scales = dict(zip(VIEW_NAMES, self.view_scale.tolist()))
        parts = []
        if scales["region"] > 0:
            pooled = [F.normalize(self.project(pool(m, a, o, self.guidance), d), dim=1)
                      for d, (pool, m, a, o) in enumerate(zip(self.pools, maps, anomaly, objects))]
            parts.append(scales["region"] * F.normalize(torch.cat(pooled, dim=1), dim=1))
        if scales["crop"] > 0:
            parts.append(scales["crop"] * F.normalize(self.project(maps[-1].float().mean((2, 3)), last), dim=1))
        if scales["image"] > 0:
            parts.append(scales["image"] * F.normalize(self.project(image.float(), self.image_entry), dim=1))
        embedding = F.normalize(torch.cat(parts, dim=1), dim=1)
        return embedding if self.adapter is None else F.normalize(embedding + self.adapter(embedding), dim=1)

    def forward(self, maps: Sequence[torch.Tensor], anomaly: Sequence[torch.Tensor], objects: Sequence[torch.Tensor],
                image: torch.Tensor) -> torch.Tensor:
        """Cosine logits / τ of a batch (what training calls, through a DDP wrapper when distributed)."""
        return self.logits(self.embed(maps, anomaly, objects, image))

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits over the prototypes, divided by the temperature."""
        return embeddings @ F.normalize(self.prototypes, dim=1).T / self.temperature

    @torch.no_grad()
    def init_prototypes(self, prototypes: np.ndarray) -> None:
        self.prototypes.copy_(F.normalize(torch.as_tensor(prototypes, dtype=torch.float32), dim=1))
