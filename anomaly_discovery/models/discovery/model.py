"""The discovery network (methods.md §1 step 5): AMGA backbone + projector + multi-head cosine prototypes, with
the guided-pooling skip path of the hybrid; ``build_model`` makes it from the :class:`ModelSettings`."""

from __future__ import annotations

import torch
from torch import nn

from ..features.backbones import IMAGENET_MEAN, IMAGENET_STD
from .config import ModelSettings
from .network import DiscoveryBackbone, HybridDiscoveryBackbone, hybrid_amga, vit_with_amga
from .prototypes import ProjectionHead, PrototypeHead


class GuidedPooling(nn.Module):
    """Skip path of the hybrid: the CNN patch features averaged with the weights softmax_j(b_j) of the Region
    Guidance Factor's bias (the CLS attention row that a zero query would give: mean pooling for ``none``,
    mask pooling for ``hard``, ρ-weighted pooling for ``amga``), projected to D and layer-normalised."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, cnn_features: torch.Tensor, patch_bias: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(patch_bias.float(), dim=1).to(cnn_features.dtype)
        return self.norm(self.proj(torch.einsum("bp,bcp->bc", weights, cnn_features.flatten(2))))


class DiscoveryModel(nn.Module):
    """Backbone → (feature, projection z, cosine logits of every head, prototypes).

    With the hybrid and ``guided_pooling`` the feature is ``GuidedPooling(CNN) + g·CLS`` with a learnable gate g
    starting at 0 (ReZero): training starts from ImageNet features pooled over the guided region, and the
    randomly initialised AMGA transformer adds to them as far as it helps (measured on synthetic data: the
    transformer alone, trained on a few hundred crops, clusters far worse than the pooled features).
    """

    def __init__(self, backbone: DiscoveryBackbone, n_classes: int, settings: ModelSettings):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(backbone.feature_dim, settings.projection_hidden, settings.projection_dim)
        self.head = PrototypeHead(backbone.feature_dim, n_classes, settings.n_heads, settings.temperature)
        self.pooling = None
        if isinstance(backbone, HybridDiscoveryBackbone) and settings.guided_pooling:
            self.pooling = GuidedPooling(backbone.proj.in_channels, backbone.feature_dim)
            self.cls_gate = nn.Parameter(torch.zeros(()))

    def features(self, inputs: torch.Tensor, anomaly_maps: torch.Tensor, object_masks: torch.Tensor,
                 from_cnn_features: bool = False) -> torch.Tensor:
        """B×D features of images (or, with ``from_cnn_features``, of cached CNN feature maps)."""
        if not isinstance(self.backbone, HybridDiscoveryBackbone):
            return self.backbone(inputs, anomaly_maps, object_masks)
        cnn = inputs if from_cnn_features else self.backbone.cnn_features(inputs)
        cls = self.backbone.forward_features(cnn, anomaly_maps, object_masks)
        if self.pooling is None:
            return cls
        grid_hw = (cnn.shape[-2], cnn.shape[-1])
        bias = self.backbone.guidance(anomaly_maps, object_masks, grid_hw)
        return self.pooling(cnn, bias) + self.cls_gate * cls

    def forward(self, inputs: torch.Tensor, anomaly_maps: torch.Tensor, object_masks: torch.Tensor,
                from_cnn_features: bool = False) -> tuple[torch.Tensor, ...]:
        features = self.features(inputs, anomaly_maps, object_masks, from_cnn_features)
        return features, self.projector(features), self.head(features), self.head.prototypes()


def build_model(settings: ModelSettings, n_classes: int) -> DiscoveryModel:
    """The backbone named by ``settings`` (offline hybrid, or a timm ViT from ``vit_weights``) with its heads."""
    if settings.backbone == "hybrid":
        backbone = hybrid_amga(cnn=settings.cnn, cnn_weights=settings.cnn_weights, embed_dim=settings.embed_dim,
                               depth=settings.depth, n_heads=settings.attention_heads,
                               n_guided_blocks=settings.n_guided_blocks,
                               trainable_cnn_stages=settings.trainable_cnn_stages, guidance=settings.guidance,
                               img_size=settings.image_size)
    else:
        guided = 9 if settings.n_guided_blocks is None else settings.n_guided_blocks
        backbone = vit_with_amga(settings.vit_model, settings.vit_weights, n_guided_blocks=guided,
                                 trainable_blocks=settings.trainable_blocks, guidance=settings.guidance)
    return DiscoveryModel(backbone, n_classes, settings)


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB → ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
