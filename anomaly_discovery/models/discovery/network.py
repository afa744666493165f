"""Discovery backbones: a ViT whose last blocks use Anomaly-Map-Guided Attention (methods.md §1 step 4, §2).

Both variants map ``(images, anomaly_maps, object_masks)`` to the CLS token after the final norm (B×D), the
feature that the prototype head L2-normalises:

- :func:`vit_with_amga`: any timm ``VisionTransformer`` (default DINO ViT-B/8, the paper's choice) loaded from a
  user weights file, its last ``n_guided_blocks`` guided and only its last ``trainable_blocks`` trainable.
- :func:`hybrid_amga`: the offline default. Patch tokens are a stride-16 ImageNet CNN feature map
  (MobileNetV2 / EfficientNet-Lite, frozen or with its last stages trainable) projected by a 1×1 conv, plus a
  learnable CLS token and position embeddings, followed by small trainable transformer blocks with AMGA.

Anomaly maps (B×1×H×W in [0, 1]) and object masks (B×1×H×W in {0, 1}) are pooled to the patch grid by the
:class:`RegionGuidanceFactor`. Without an anomaly map no bias is applied (plain attention).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from .amga import AMGABlock, RegionGuidanceFactor
from ..features.backbones import StagedFeatureExtractor, WeightsError, read_state_dict, build_backbone

Guidance = Union[str, RegionGuidanceFactor]
DEFAULT_VIT = "vit_base_patch8_224"
DEFAULT_CNN_LAYER = {"mobilenet_v2": 13, "tiny": 3}
CHECKPOINT_PREFIXES = ("module.", "backbone.")


def as_guidance(guidance: Guidance) -> RegionGuidanceFactor:
    """``"none" | "hard" | "amga"`` (default factors) or a ready :class:`RegionGuidanceFactor`."""
    return guidance if isinstance(guidance, RegionGuidanceFactor) else RegionGuidanceFactor(mode=guidance)


def _needs_grad(module: nn.Module, *tensors: Optional[torch.Tensor]) -> bool:
    return (any(p.requires_grad for p in module.parameters())
            or any(t is not None and t.requires_grad for t in tensors))


def _check_map(name: str, maps: Optional[torch.Tensor], batch: int) -> None:
    if maps is None:
        return
    if maps.dim() != 4 or maps.shape[0] != batch or maps.shape[1] != 1:
        raise ValueError(f"{name} must be B×1×H×W with B={batch}, got shape {tuple(maps.shape)}")
    if maps.numel() and (maps.min() < 0 or maps.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1], got range [{maps.min().item():.3g}, {maps.max().item():.3g}]")


class DiscoveryBackbone(nn.Module):
    """Shared forward: embed → blocks (the last ``n_guided_blocks`` with the CLS-row bias) → norm → CLS token.

    Subclasses provide ``embed(images) -> (tokens B×N×D, grid_hw)``, ``patch_grid(input_hw)``, ``blocks`` and
    ``norm``. A step whose inputs and parameters need no gradient runs without autograd (frozen prefixes).
    """

    blocks: nn.ModuleList
    norm: nn.Module

    def __init__(self, guidance: Guidance, n_guided_blocks: int, depth: int, feature_dim: int):
        super().__init__()
        if not 0 <= n_guided_blocks <= depth:
            raise ValueError(f"n_guided_blocks must lie in [0, {depth}], got {n_guided_blocks}")
        self.guidance = as_guidance(guidance)
        self.n_guided_blocks = n_guided_blocks
        self.feature_dim = feature_dim

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        raise NotImplementedError

    def patch_grid(self, input_hw: Sequence[int]) -> tuple[int, int]:
        raise NotImplementedError

    def cls_bias(self, anomaly_maps: Optional[torch.Tensor], object_masks: Optional[torch.Tensor],
                 grid_hw: tuple[int, int], n_tokens: int) -> Optional[torch.Tensor]:
        """B×N CLS-row bias: 0 for the prefix tokens (CLS attends to itself), the RGF bias for each patch."""
        if anomaly_maps is None:
            return None
        patch_bias = self.guidance(anomaly_maps, object_masks, grid_hw)
        prefix = n_tokens - patch_bias.shape[1]
        return torch.cat([patch_bias.new_zeros(patch_bias.shape[0], prefix), patch_bias], dim=1)

    def run_blocks(self, tokens: torch.Tensor, grid_hw: tuple[int, int], anomaly_maps: Optional[torch.Tensor],
                   object_masks: Optional[torch.Tensor]) -> torch.Tensor:
        """Embedded tokens (B×N×D) → blocks (the last ``n_guided_blocks`` with the CLS-row bias) → norm → CLS."""
        bias = self.cls_bias(anomaly_maps, object_masks, grid_hw, tokens.shape[1])
        first_guided = len(self.blocks) - self.n_guided_blocks
        grad_enabled = torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            block_bias = bias if index >= first_guided else None
            with torch.set_grad_enabled(grad_enabled and _needs_grad(block, tokens, block_bias)):
                tokens = block(tokens, cls_bias=block_bias)
        with torch.set_grad_enabled(grad_enabled and _needs_grad(self.norm, tokens)):
            return self.norm(tokens)[:, 0]

    def forward(self, images: torch.Tensor, anomaly_maps: Optional[torch.Tensor] = None,
                object_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B×3×H×W, got shape {tuple(images.shape)}")
        _check_map("anomaly_maps", anomaly_maps, images.shape[0])
        _check_map("object_masks", object_masks, images.shape[0])
        tokens, grid_hw = self.embed(images)
        return self.run_blocks(tokens, grid_hw, anomaly_maps, object_masks)


def _normalise_checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(state.get("teacher"), dict):
        state = state["teacher"]
    normalised = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in CHECKPOINT_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        normalised[key] = value
    return normalised


def load_vit_weights(model: nn.Module, path: Union[str, Path], architecture: str) -> None:
    """Load a timm or DINO-style ViT state dict (``module.``/``backbone.`` prefixes stripped, classifier head
    dropped) strictly into ``model``; any missing, extra or mis-shaped tensor is a WeightsError naming the file."""
    path = Path(path)
    state = _normalise_checkpoint_keys(read_state_dict(path, architecture))
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith("head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mis_shaped:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" if label == "wrong shape"
                                  else k for k in keys[:4])
                details.append(f"{len(keys)} {label} ({shown}{', …' if len(keys) > 4 else ''})")
        raise WeightsError(f"weights file {path} does not fit {architecture}: " + "; ".join(details))
    model.load_state_dict(state, strict=True)


class ViTDiscoveryBackbone(DiscoveryBackbone):
    """A timm ViT (created with ``pretrained=False``) with AMGA in its last blocks; see :func:`vit_with_amga`."""

    def __init__(self, model_name: str = DEFAULT_VIT, weights: Union[str, Path, None] = None,
                 n_guided_blocks: int = 9, trainable_blocks: int = 1, guidance: Guidance = "amga", **timm_kwargs):
        import timm
        from timm.models.vision_transformer import VisionTransformer

        try:
            vit = timm.create_model(model_name, pretrained=False, num_classes=0, block_fn=AMGABlock,
                                    dynamic_img_size=True, **timm_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"timm model {model_name!r} cannot take AMGA blocks: {exc}") from exc
        if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
            raise ValueError(f"timm model {model_name!r} is not a VisionTransformer with a CLS token")
        depth = len(vit.blocks)
        super().__init__(guidance, n_guided_blocks, depth, vit.embed_dim)
        if not 0 <= trainable_blocks <= depth:
            raise ValueError(f"trainable_blocks must lie in [0, {depth}], got {trainable_blocks}")
        if weights is not None:
            load_vit_weights(vit, weights, f"timm {model_name}")
        vit.requires_grad_(False)
        for block in vit.blocks[depth - trainable_blocks:]:
            block.requires_grad_(True)
        self.vit = vit
        self.trainable_blocks = trainable_blocks

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        return self.vit.norm

    def patch_grid(self, input_hw: Sequence[int]) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.dynamic_feat_size((int(input_hw[0]), int(input_hw[1]))))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        vit = self.vit
        embedding_params = [vit.patch_embed, vit.norm_pre]
        trainable = any(_needs_grad(m) for m in embedding_params) or any(
            p is not None and p.requires_grad for p in (vit.cls_token, vit.reg_token, vit.pos_embed))
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            patches = vit.patch_embed(images)
            grid_hw = (patches.shape[1], patches.shape[2])
            tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(patches)))
        return tokens, grid_hw


class HybridDiscoveryBackbone(DiscoveryBackbone):
    """CNN stride-16 patch embedding + CLS/position embeddings + AMGA transformer blocks; see :func:`hybrid_amga`."""

    def __init__(self, cnn: str = "mobilenet_v2", cnn_layer: Optional[int] = None,
                 cnn_weights: Union[str, Path, None] = None, embed_dim: int = 192, depth: int = 4, n_heads: int = 3,
                 mlp_ratio: float = 4.0, n_guided_blocks: Optional[int] = None, trainable_cnn_stages: int = 0,
                 guidance: Guidance = "amga", img_size: int = 224):
        n_guided_blocks = depth if n_guided_blocks is None else n_guided_blocks
        super().__init__(guidance, n_guided_blocks, depth, embed_dim)
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by n_heads={n_heads}")
        layer = cnn_layer if cnn_layer is not None else DEFAULT_CNN_LAYER.get(cnn)
        extractor = build_backbone(cnn, cnn_weights, layers=(layer,) if layer is not None else None)
        if not isinstance(extractor, StagedFeatureExtractor):
            raise ValueError(f"cnn {cnn!r} is not a staged CNN: use mobilenet_v2, efficientnet_lite0/1/2 or tiny")
        tap = extractor.taps[-1]
        self.cnn_stages = nn.ModuleList(extractor.stages[:tap + 1]).to(memory_format=torch.channels_last)
        if not 0 <= trainable_cnn_stages <= len(self.cnn_stages):
            raise ValueError(f"trainable_cnn_stages must lie in [0, {len(self.cnn_stages)}], "
                             f"got {trainable_cnn_stages}")
        self.cnn_stages.requires_grad_(False)
        for stage in self.cnn_stages[len(self.cnn_stages) - trainable_cnn_stages:]:
            stage.requires_grad_(True)
        self.cnn_name, self.cnn_stride = extractor.name, extractor.strides[-1]
        self.trainable_cnn_stages = trainable_cnn_stages
        self.proj = nn.Conv2d(extractor.channels[-1], embed_dim, kernel_size=1)
        self.reference_grid = (math.ceil(img_size / self.cnn_stride),) * 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.reference_grid[0] * self.reference_grid[1], embed_dim))
        self.blocks = nn.ModuleList(
            AMGABlock(dim=embed_dim, num_heads=n_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_transformer()
        self._grid_cache: dict[tuple[int, int], tuple[int, int]] = {}

    def _init_transformer(self) -> None:
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> "HybridDiscoveryBackbone":
        """Train mode for the transformer; the CNN keeps its ImageNet batch-norm statistics (always eval)."""
        super().train(mode)
        self.cnn_stages.eval()
        return self

    def cnn_features(self, images: torch.Tensor) -> torch.Tensor:
        """The stride-16 CNN feature map; the frozen leading stages run without autograd, channels-last (about twice
        as fast for depthwise convolutions on CPU)."""
        first_trainable = len(self.cnn_stages) - self.trainable_cnn_stages
        features = images.contiguous(memory_format=torch.channels_last)
        grad_enabled = torch.is_grad_enabled()
        for index, stage in enumerate(self.cnn_stages):
            with torch.set_grad_enabled(grad_enabled and index >= first_trainable):
                features = stage(features)
        return features

    def patch_grid(self, input_hw: Sequence[int]) -> tuple[int, int]:
        key = (int(input_hw[0]), int(input_hw[1]))
        if key not in self._grid_cache:
            with torch.no_grad():
                probe = self.cnn_features(torch.zeros(1, 3, *key, device=self.pos_embed.device))
            self._grid_cache[key] = (probe.shape[-2], probe.shape[-1])
        return self._grid_cache[key]

    def tokens_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """CNN feature map B×C×h×w → projected patch tokens with the CLS token and position embeddings."""
        patches = self.proj(features)
        grid_hw = (patches.shape[-2], patches.shape[-1])
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], 1)
        pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=grid_hw, old_size=self.reference_grid,
                                           num_prefix_tokens=1)
        return tokens + pos_embed, grid_hw

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.tokens_from_features(self.cnn_features(images))

    def forward_features(self, features: torch.Tensor, anomaly_maps: Optional[torch.Tensor],
                         object_masks: Optional[torch.Tensor]) -> torch.Tensor:
        """The forward from the (frozen, possibly cached) CNN feature map B×C×h×w on; maps may already be pooled
        to the h×w grid. Equal to ``forward`` on the images those features came from."""
        return self.run_blocks(*self.tokens_from_features(features), anomaly_maps, object_masks)


def vit_with_amga(model_name: str = DEFAULT_VIT, weights: Union[str, Path, None] = None, n_guided_blocks: int = 9,
                  trainable_blocks: int = 1, guidance: Guidance = "amga", **timm_kwargs) -> ViTDiscoveryBackbone:
    """A timm ViT from the user's weights file (``None`` = random init, for tests) with AMGA in its last
    ``n_guided_blocks`` blocks and only the last ``trainable_blocks`` blocks trainable."""
    return ViTDiscoveryBackbone(model_name, weights, n_guided_blocks, trainable_blocks, guidance, **timm_kwargs)


def hybrid_amga(cnn: str = "mobilenet_v2", cnn_layer: Optional[int] = None, embed_dim: int = 192, depth: int = 4,
                n_heads: int = 3, n_guided_blocks: Optional[int] = None, trainable_cnn_stages: int = 0,
                guidance: Guidance = "amga", **kwargs) -> HybridDiscoveryBackbone:
    """The offline default: ImageNet CNN stride-16 patch tokens (frozen unless ``trainable_cnn_stages``) followed by
    ``depth`` trainable transformer blocks, all guided unless ``n_guided_blocks`` says fewer."""
    return HybridDiscoveryBackbone(cnn, cnn_layer, embed_dim=embed_dim, depth=depth, n_heads=n_heads,
                                   n_guided_blocks=n_guided_blocks, trainable_cnn_stages=trainable_cnn_stages,
                                   guidance=guidance, **kwargs)
