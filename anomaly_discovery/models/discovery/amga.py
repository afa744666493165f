"""Anomaly-Map-Guided Attention (AMGA) with a Region Guidance Factor (methods.md §1 step 4, §2 steps 3–4).

In the last guided blocks of a ViT only the CLS *query row* of self-attention gets an additive bias b over the
keys; the patch rows are unchanged:

    Attn = softmax(concat(Q_cls Kᵀ/√d + b, Q_patch Kᵀ/√d)) V,
    b = (0 for the CLS key, b_1 … b_P for the patches).

The bias per patch j comes from the anomaly map and the object prior average-pooled to the patch grid
(ā_j = pooled anomaly score/coverage in [0, 1], o_j = fraction of object pixels in [0, 1]):

- ``hard`` (AnomalyNCD's MGViT): b_j = 0 where ā_j ≥ 0.5, else −1e9. When no patch is at least half covered the
  CLS query attends only to itself.
- ``amga`` (ProtoAnomalyNCD's Region Guidance Factor, our reconstruction): b_j = log(ε + ρ_j) with the soft
  blend

      ρ_j = ā_j·(1 + γ·ā_j) + (1 − ā_j)·(o_j·ρ_obj + (1 − o_j)·ρ_bg),

  i.e. ρ ≈ ρ_bg on background, ρ_obj ∈ (0, 1) on normal object patches and ρ_anom = 1 + γ·ā_j ≥ 1 on anomalous
  ones, so background < normal object < anomaly. Learnable factors stay in range through their
  parametrisation ρ_obj = sigmoid(θ_obj), ρ_bg = ρ_obj·sigmoid(θ_bg), γ = softplus(θ_γ).
- ``none``: b = 0 (plain attention).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

GUIDANCE_MODES = ("none", "hard", "amga")
HARD_MASK_VALUE = -1e9
HARD_COVERAGE = 0.5


def pool_to_patch_grid(maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Average-pool B×1×H×W maps onto the patch grid: B×(gh·gw) in token (row-major) order.

    When H×W is a multiple of the grid this is AvgPool with the patch size as kernel and stride; otherwise it
    falls back to adaptive average pooling over the nearest pixel bins.
    """
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be B×1×H×W, got shape {tuple(maps.shape)}")
    grid_h, grid_w = int(grid_hw[0]), int(grid_hw[1])
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_hw must be positive, got {grid_hw}")
    height, width = maps.shape[-2:]
    maps = maps.float()
    if height % grid_h == 0 and width % grid_w == 0:
        pooled = F.avg_pool2d(maps, kernel_size=(height // grid_h, width // grid_w))
    else:
        pooled = F.adaptive_avg_pool2d(maps, (grid_h, grid_w))
    return pooled.flatten(1)


def hard_guidance_bias(coverage: torch.Tensor) -> torch.Tensor:
    """AnomalyNCD's mask: 0 where a patch is at least half covered by the anomaly mask, −1e9 elsewhere."""
    return torch.where(coverage >= HARD_COVERAGE, torch.zeros_like(coverage),
                       torch.full_like(coverage, HARD_MASK_VALUE))


def region_guidance_weights(anomaly: torch.Tensor, objectness: torch.Tensor, rho_background: torch.Tensor,
                            rho_object: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The Region Guidance Factor ρ_j, a soft blend of background, normal object and anomaly (module docstring)."""
    normal = objectness * rho_object + (1.0 - objectness) * rho_background
    return anomaly * (1.0 + gamma * anomaly) + (1.0 - anomaly) * normal


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


class RegionGuidanceFactor(nn.Module):
    """Per-patch additive CLS-row bias b_j from pooled anomaly and object maps; see the module docstring.

    ``forward(anomaly_maps, object_masks, grid_hw) -> B×P`` where the maps are B×1×H×W in [0, 1] and
    ``object_masks=None`` means the whole image is object.
    """

    def __init__(self, mode: str = "amga", learnable: bool = True, rho_background: float = 1e-3,
                 rho_object: float = 0.1, gamma: float = 1.0, eps: float = 1e-4):
        super().__init__()
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode {mode!r} is not one of {', '.join(GUIDANCE_MODES)}")
        if not 0.0 < rho_object < 1.0:
            raise ValueError(f"rho_object must lie in (0, 1), got {rho_object}")
        if not 0.0 < rho_background < rho_object:
            raise ValueError(f"rho_background must lie in (0, rho_object={rho_object}), got {rho_background}")
        if gamma <= 0.0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.mode = mode
        self.eps = eps
        raw = torch.tensor([_logit(rho_object), _logit(rho_background / rho_object), _softplus_inverse(gamma)])
        self.learnable = learnable and mode == "amga"
        if self.learnable:
            self.raw_factors = nn.Parameter(raw)
        else:
            self.register_buffer("raw_factors", raw)

    @property
    def rho_object(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_factors[0])

    @property
    def rho_background(self) -> torch.Tensor:
        return self.rho_object * torch.sigmoid(self.raw_factors[1])

    @property
    def gamma(self) -> torch.Tensor:
        return F.softplus(self.raw_factors[2])

    def forward(self, anomaly_maps: torch.Tensor, object_masks: Optional[torch.Tensor],
                grid_hw: tuple[int, int]) -> torch.Tensor:
        anomaly = pool_to_patch_grid(anomaly_maps, grid_hw).clamp(0.0, 1.0)
        if self.mode == "none":
            return torch.zeros_like(anomaly)
        if self.mode == "hard":
            return hard_guidance_bias(anomaly)
        objectness = (torch.ones_like(anomaly) if object_masks is None
                      else pool_to_patch_grid(object_masks, grid_hw).clamp(0.0, 1.0))
        rho = region_guidance_weights(anomaly, objectness, self.rho_background, self.rho_object, self.gamma)
        return torch.log(self.eps + rho)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, learnable={self.learnable}, eps={self.eps}"


class AMGAAttention(Attention):
    """timm's ``Attention`` (same parameters, so ViT checkpoints load) whose CLS query row takes an extra bias.

    ``forward(x, cls_bias=B×N)`` adds ``cls_bias`` to the logits of query row 0 before the softmax; the other rows
    are computed exactly as in timm. Without ``cls_bias`` it is timm's forward.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                cls_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cls_bias is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("cls_bias cannot be combined with attn_mask or is_causal")
        batch, tokens, _ = x.shape
        if tuple(cls_bias.shape) != (batch, tokens):
            raise ValueError(f"cls_bias must be B×N = {batch}×{tokens}, got shape {tuple(cls_bias.shape)}")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        cls_row = F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=cls_bias.to(q.dtype)[:, None, None, :],
                                                 dropout_p=dropout)
        other_rows = F.scaled_dot_product_attention(q[:, :, 1:], k, v, dropout_p=dropout)
        x = torch.cat([cls_row, other_rows], dim=2).transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class AMGABlock(Block):
    """timm's pre-norm ``Block`` built with :class:`AMGAAttention`; ``forward(x, cls_bias=None)`` passes the bias."""

    def __init__(self, *args, attn_layer=AMGAAttention, **kwargs):
        if attn_layer in (Attention, "", "attn"):
            attn_layer = AMGAAttention
        if not (isinstance(attn_layer, type) and issubclass(attn_layer, AMGAAttention)):
            raise ValueError(f"AMGABlock supports timm's standard Attention only, got attn_layer={attn_layer!r}")
        super().__init__(*args, attn_layer=attn_layer, **kwargs)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                cls_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        attended = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, cls_bias=cls_bias)
        x = x + self.drop_path1(self.ls1(attended))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
