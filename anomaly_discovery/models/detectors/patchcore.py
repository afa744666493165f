"""PatchCore-style detection (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

1. Locally aware patch features (§3.1): every tapped feature map is averaged over a p×p neighbourhood
   (p = 3), upsampled to the finest tapped grid and concatenated along channels; ``feature_dim`` optionally
   resamples each layer's channels (adaptive average pooling) to an equal share of that many dimensions,
   so that every layer weighs the same in the distances.
2. Memory bank M (§3.2): the patch features of all normal images, subsampled by greedy coreset
   (:mod:`..features.coreset`, ``coreset_ratio`` of the bank).
3. Map: each test patch gets s = min_{m ∈ M} ‖m_test − m‖₂; the patch scores are upsampled to the network
   input, Gaussian-blurred (σ = 4 px at that input resolution), then resized to each image's own size. The
   search is a FAISS inverted file (one list per 64 bank rows, ``probes`` 8 lists searched; ``probes=None``:
   exact): on MTD's normal images with simulated anomalies 32 probes gave the exact search's image AUROC, pixel
   AUROC and AUPRO to within .0002, 8 probes to within .0015 in 17% less predict time than 32 (the fewest of 32,
   16 and 8 within .002: benchmarks/detector_selection.py, rules fixed before their runs).
4. Image score (§3.3), ``image_score`` "anomalib" (default): anomalib's published PatchCore score, adopted as
   is: its own embedding of the image (plain channel concatenation, zero-padded 3×3 pooling, no border padding)
   against ``score_bank_``, that embedding at the same coreset positions; the top patch's distance s* (Eq. 6)
   reweighted (Eq. 7) by w = 1 − exp‖m_test* − m*‖ / Σ_{m ∈ N_9(m*)} exp‖m_test* − m‖. It costs a second
   backbone pass but few searches: each patch's distance to the score-bank row of its nearest map-bank row
   bounds its distance from above, so only patches whose bound beats the best exact distance are searched.
   ``image_score`` "map": the map's top patch, reweighted by Eq. 7 over ``k`` neighbours when k > 1 (one
   backbone pass). On MTD the map-feature score ranked images at .871 image AUROC where anomalib's reached .965
   (issue 13), while simulated anomalies on MTD's normal images could not tell the two apart
   (benchmarks/detector_selection.py), so the map keeps the selected features and the image score is anomalib's.

Defaults, chosen on generated data (anomaly_discovery.data.synthetic, metal plate and bottle, 60 and 200
normal training images; never on a benchmark's labels): MobileNetV2 taps 6 and 13 (strides 8 and 16; adding
tap 10 or 17 or dropping tap 6 did not help), ``feature_dim`` 128 (equal channel shares per layer: AUPRO
+.007 / +.002 over plain concatenation at the same size), ``coreset_ratio`` .03 (pixel AUROC within .002 of .1
at a third of the bank; .01 lost .005 more), greedy distances in a 32-d projection (same scores as 128-d, up to
10× faster selection), k = 1 (Eq. 7 reweighting with k = 3 or 9 changed nothing measurable). ``border_pad`` 32
(reflect padding, see :func:`embed_batch`): on 240 generated images AUPRO .966 → .972 (bottle) and
.967 → .974 (metal plate), image AUROC .991 → 1.0 and .936 → 1.0, for 1.56× the backbone's pixels.

``image_size`` 320 was chosen on MTD's NORMAL TRAINING images (benchmarks/detector_selection.py: fit on 80%,
score the other 20% plus simulated anomalies at two strengths; no MTD test image or label read): against 256,
AUPRO .725 → .777 and .643 → .696, image AUROC .995 → .997 and .971 → .978, for ≈ 1.6× the cost (on generated
data 224 had lost AUPRO and 320 gained ≈ .008). The same runs confirmed ``feature_dim`` 128, ``border_pad`` 32,
k = 1 and ``coreset_ratio`` .03 (.1: no gain at 3× the fit time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..features.backbones import (FeatureExtractor, autocast_for, build_backbone, check_images, for_inference,
                                  images_to_tensor, resolve_device)
from ..features.coreset import coreset_size, greedy_coreset_indices
from .protocol import Detection, resize_map

BANK_FORMAT = "adisc-patchcore-1"
BLUR_SIGMA = 4.0
IMAGE_SCORES = ("anomalib", "map")
ANOMALIB_NEIGHBOURS = 9  # anomalib's PatchcoreModel num_neighbors
TOP_PATCH_CHUNK = 64
IVF_ROWS_PER_LIST = 64


def local_patch_features(feature_maps: Sequence[torch.Tensor], neighbourhood: int = 3,
                         feature_dim: int | None = None, include_padding: bool = False) -> torch.Tensor:
    """B×D×h×w locally aware patch features on the finest grid of ``feature_maps`` (PatchCore §3.1).

    Each map is averaged over a ``neighbourhood``×``neighbourhood`` window (stride 1; border pixels averaged
    over the window part inside the map, or with ``include_padding`` over the whole window with zeros outside,
    as anomalib's ``AvgPool2d(3, 1, 1)``), bilinearly upsampled to the finest grid and concatenated. With
    ``feature_dim``, each layer's channels are first adaptively average-pooled to ``feature_dim // len(maps)``.
    """
    grid = max((tuple(m.shape[-2:]) for m in feature_maps), key=lambda hw: hw[0] * hw[1])
    layers = []
    for feature_map in feature_maps:
        feature_map = feature_map.float()
        if neighbourhood > 1:
            feature_map = F.avg_pool2d(feature_map, neighbourhood, stride=1, padding=neighbourhood // 2,
                                       count_include_pad=include_padding)
        if tuple(feature_map.shape[-2:]) != grid:
            feature_map = F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)
        if feature_dim is not None:
            batch, channels, height, width = feature_map.shape
            per_layer = max(1, feature_dim // len(feature_maps))
            flat = feature_map.permute(0, 2, 3, 1).reshape(-1, 1, channels)
            feature_map = F.adaptive_avg_pool1d(flat, per_layer).reshape(batch, height, width, per_layer)
            feature_map = feature_map.permute(0, 3, 1, 2)
        layers.append(feature_map)
    return torch.cat(layers, dim=1)


def check_border_pad(extractor: FeatureExtractor, border_pad: int, image_size: int) -> None:
    coarsest = max(extractor.strides)
    if border_pad % coarsest or not 0 <= border_pad < image_size:
        raise ValueError(f"border_pad must be a multiple of the backbone's coarsest stride {coarsest} and smaller "
                         f"than image_size {image_size}, got {border_pad}")


def embed_batch(extractor: FeatureExtractor, batch: torch.Tensor, neighbourhoods: Sequence[int] = (3,),
                feature_dim: int | None = None, border_pad: int = 0,
                include_padding: bool = False) -> list[torch.Tensor]:
    """One normalised B×3×S×S batch → one B×h×w×D float32 patch-feature tensor per neighbourhood size.

    The backbone runs once (bf16 autocast on CUDA). With ``border_pad`` > 0 (a multiple of the coarsest
    stride), the batch is first reflect-padded by that many pixels and the padded cells are cut off the
    feature grid again: border patches then see image content instead of the convolutions' zero padding,
    which otherwise makes them rare and so "anomalous".
    """
    if border_pad:
        batch = F.pad(batch, (border_pad,) * 4, mode="reflect")
    batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_for(batch.device):
        maps = [m.float() for m in extractor(batch)]
    with torch.inference_mode():
        features = [local_patch_features(maps, size, feature_dim, include_padding) for size in neighbourhoods]
        if border_pad:
            cut = border_pad // min(extractor.strides)
            features = [f[..., cut:f.shape[-2] - cut, cut:f.shape[-1] - cut] for f in features]
        return [f.permute(0, 2, 3, 1).contiguous() for f in features]


def patch_feature_batches(extractor: FeatureExtractor, images: Sequence[np.ndarray], image_size: int,
                          batch_size: int, device: torch.device, neighbourhoods: Sequence[int] = (3,),
                          feature_dim: int | None = None, progress: bool = True,
                          description: str = "features", border_pad: int = 0) -> Iterator[list[torch.Tensor]]:
    """For each batch of images, :func:`embed_batch`'s tensors (on ``device``)."""
    check_border_pad(extractor, border_pad, image_size)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress, leave=False):
        batch = images_to_tensor(images[start:start + batch_size], image_size).to(device)
        yield embed_batch(extractor, batch, neighbourhoods, feature_dim, border_pad)


def gaussian_blur(maps: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of B×1×H×W maps (kernel truncated at 4σ, reflected borders)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    pad_h, pad_w = min(radius, maps.shape[-2] - 1), min(radius, maps.shape[-1] - 1)
    maps = F.pad(maps, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else maps
    maps = F.conv2d(maps, kernel[radius - pad_w:radius + pad_w + 1].view(1, 1, 1, -1))
    maps = F.pad(maps, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else maps
    return F.conv2d(maps, kernel[radius - pad_h:radius + pad_h + 1].view(1, 1, -1, 1))


def anomaly_maps(patch_scores: torch.Tensor, image_size: int, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """B×h×w patch scores → one blurred float32 map per image, at that image's own (H, W)."""
    upsampled = F.interpolate(patch_scores[:, None].float(), size=(image_size, image_size), mode="bilinear",
                              align_corners=False)
    blurred = gaussian_blur(upsampled)[:, 0].cpu()
    return [resize_map(blurred[i], image.shape[:2]) for i, image in enumerate(images)]


def build_index(bank: torch.Tensor, device: torch.device,
                probes: int | None = None) -> tuple[faiss.Index, object | None]:
    """A FAISS L2 index over the bank (on the GPU when faiss has GPUs and ``device`` is CUDA).

    ``probes`` None: exact (flat). Else an inverted file: the bank split by k-means (FAISS's fixed seed) into
    one list per ``IVF_ROWS_PER_LIST`` rows, ``probes`` lists searched per query; a bank too small for more lists
    than ``probes`` stays flat. Returns the index and the GPU resources it needs alive (``None`` on CPU).
    """
    rows = np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32)
    lists = len(rows) // IVF_ROWS_PER_LIST
    if probes is None or lists <= probes:
        index = faiss.IndexFlatL2(bank.shape[1])
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], lists)
        index.train(rows)
        index.nprobe = probes
    resources = None
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    index.add(rows)
    return index, resources


def reweighting(test_patch: np.ndarray, nearest: int, bank: np.ndarray, index: faiss.Index, k: int) -> float:
    """PatchCore Eq. 7 weight 1 − softmax(‖m_test* − m‖ over m ∈ N_k(m*))[m*] for the top patch."""
    _, support = index.search(bank[nearest][None], k)
    support = support[0][support[0] >= 0]
    distances = np.linalg.norm(bank[support] - test_patch[None], axis=1).astype(np.float64)
    own = np.linalg.norm(bank[nearest] - test_patch)
    logits = np.concatenate([[own], distances[support != nearest]])
    logits -= logits.max()
    return float(1.0 - np.exp(logits[0]) / np.exp(logits).sum())


def top_patch(patches: torch.Tensor, upper_sq: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor,
              chunk: int = TOP_PATCH_CHUNK) -> tuple[int, int, float]:
    """(patch, its nearest bank row, squared distance) of the patch farthest from its nearest bank row.

    ``upper_sq`` bounds each patch's squared nearest distance from above (its distance to any one bank row),
    so patches are searched exactly (‖x‖² + ‖m‖² − 2x·m against every row; for a few dozen queries one matrix
    product beats FAISS's search) in decreasing bound, ``chunk`` at a time, until no bound left beats the best
    distance found: the same answer as searching every patch. ``bank_sq`` holds the rows' squared norms.
    """
    order = torch.argsort(upper_sq, descending=True, stable=True)
    best = (-1, -1, -1.0)
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        if float(upper_sq[rows[0]]) <= best[2]:
            break
        queries = patches[rows]
        distances, nearest = torch.addmm(bank_sq[None], queries, bank.T, alpha=-2.0).min(1)
        distances += queries.pow(2).sum(1)
        pick = int(distances.argmax())
        if float(distances[pick]) > best[2]:
            best = (int(rows[pick]), int(nearest[pick]), float(distances[pick]))
    return best


def rows_at(batches: Iterator[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The rows at global ``positions`` (in that order) of the B×h×w×D batches flattened and stacked, keeping
    only those rows in memory."""
    order = torch.argsort(positions)
    wanted = positions[order].cpu()
    out, offset, cursor = None, 0, 0
    for batch in batches:
        flat = batch.reshape(-1, batch.shape[-1]).cpu()
        out = flat.new_empty(len(positions), flat.shape[1]) if out is None else out
        end = int(torch.searchsorted(wanted, offset + flat.shape[0]))
        out[order[cursor:end]] = flat[wanted[cursor:end] - offset]
        cursor, offset = end, offset + flat.shape[0]
    return out


class PatchCoreDetector:
    """PatchCore-style detector: ``fit(normal_images)`` builds the coreset memory bank ``memory_bank_`` (and,
    with ``image_score`` "anomalib", ``score_bank_``).

    ``coreset_indices_`` are the bank rows' positions among all patches of the fitted images (image-major,
    then row-major over the patch grid); both banks hold the patches at these positions.
    """

    name = "patchcore"

    def __init__(self, backbone: str = "mobilenet_v2", weights: str | Path | None = None,
                 layers: Sequence[int] | Sequence[str] | None = None, image_size: int = 320,
                 coreset_ratio: float = 0.03, k: int = 1, feature_dim: int | None = 128,
                 coreset_projection_dim: int | None = 32, batch_size: int = 16, border_pad: int = 32,
                 image_score: str = "anomalib", probes: int | None = 8, device: str | None = "auto", seed: int = 0,
                 progress: bool = True):
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        if probes is not None and probes < 1:
            raise ValueError(f"probes must be at least 1 (or None for the exact search), got {probes}")
        coreset_size(1, coreset_ratio)
        self.backbone, self.weights, self.layers = backbone, weights, list(layers) if layers else None
        self.image_size, self.coreset_ratio, self.k, self.feature_dim = image_size, coreset_ratio, k, feature_dim
        self.coreset_projection_dim, self.border_pad, self.image_score = coreset_projection_dim, border_pad, image_score
        self.batch_size, self.probes, self.seed, self.progress = batch_size, probes, seed, progress
        self.device = resolve_device(device)
        self.extractor = for_inference(build_backbone(backbone, weights, self.layers)).to(self.device)
        check_border_pad(self.extractor, border_pad, image_size)
        self.memory_bank_: torch.Tensor | None = None
        self.score_bank_: torch.Tensor | None = None

    @property
    def feature_size(self) -> int:
        """Dimension of one patch feature of the map."""
        channels = self.extractor.channels
        if self.feature_dim is None:
            return sum(channels)
        return max(1, self.feature_dim // len(channels)) * len(channels)

    def _batches(self, images: Sequence[np.ndarray], description: str) -> Iterator[torch.Tensor]:
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=description, unit="batch", disable=not self.progress, leave=False):
            yield images_to_tensor(images[start:start + self.batch_size], self.image_size).to(self.device)

    def _map_features(self, batch: torch.Tensor) -> torch.Tensor:
        """The map's patch features of one batch (B×h×w×D)."""
        return embed_batch(self.extractor, batch, (3,), self.feature_dim, self.border_pad)[0]

    def _score_features(self, batch: torch.Tensor) -> torch.Tensor:
        """anomalib's embedding of one batch (plain concatenation, zero-padded pooling, no border padding)."""
        return embed_batch(self.extractor, batch, (3,), None, 0, include_padding=True)[0]

    def fit(self, normal_images: Sequence[np.ndarray]) -> "PatchCoreDetector":
        """Extract the patch features of ``normal_images`` and keep a greedy coreset of them."""
        images = check_images(normal_images)
        if not images:
            raise ValueError("fit needs at least one normal image, got none")
        bank = torch.cat([self._map_features(batch).flatten(0, 2) for batch in self._batches(images, "patchcore fit")])
        size = coreset_size(bank.shape[0], self.coreset_ratio)
        if size < bank.shape[0]:
            picks = greedy_coreset_indices(bank, size, self.coreset_projection_dim, self.seed, self.progress)
        else:
            picks = torch.arange(bank.shape[0], device=bank.device)
        self.coreset_indices_ = picks.cpu()
        score_bank = None
        if self.image_score == "anomalib":
            batches = (self._score_features(batch) for batch in self._batches(images, "patchcore score bank"))
            score_bank = rows_at(batches, self.coreset_indices_)  # the map's features come from the first pass
        self._set_bank(bank[picks], score_bank)
        return self

    def _set_bank(self, bank: torch.Tensor, score_bank: torch.Tensor | None) -> None:
        self.memory_bank_ = bank.float().cpu().contiguous()
        self._index, self._gpu_resources = build_index(self.memory_bank_, self.device, self.probes)
        if self.image_score == "anomalib":
            self.score_bank_ = score_bank.float().cpu().contiguous()
            self._score_bank_array = self.score_bank_.numpy()
            self._score_bank_sq = self.score_bank_.pow(2).sum(1)
            self._score_index, _ = build_index(self.score_bank_, torch.device("cpu"))
        else:
            self._bank_array = self.memory_bank_.numpy()

    def predict(self, images: Sequence[np.ndarray]) -> list[Detection]:
        """Score every image and give its blurred anomaly map at its own size.

        Image score, ``image_score`` "anomalib": anomalib's PatchCore score (its embedding, Eq. 7 over its 9
        neighbours) against ``score_bank_``; "map": the map's top patch, reweighted by Eq. 7 when ``k`` > 1.
        """
        if self.memory_bank_ is None:
            raise RuntimeError("PatchCoreDetector is not fitted: call fit(normal_images) or load(path) first")
        images = check_images(images)
        detections: list[Detection] = []
        start = 0
        scored = self.image_score == "anomalib"
        for images_batch in self._batches(images, "patchcore predict"):
            features = self._map_features(images_batch)
            score_features = self._score_features(images_batch) if scored else None
            batch, height, width, dim = features.shape
            queries = np.ascontiguousarray(features.reshape(-1, dim).cpu().numpy(), dtype=np.float32)
            squared, nearest = self._index.search(queries, 1)
            scores = np.sqrt(np.maximum(squared[:, 0], 0.0)).reshape(batch, height * width)
            nearest = nearest[:, 0].reshape(batch, height * width)
            maps = anomaly_maps(torch.from_numpy(scores.reshape(batch, height, width)), self.image_size,
                                images[start:start + batch])
            for i, anomaly_map in enumerate(maps):
                if scored:
                    score = self._anomalib_score(score_features[i].reshape(height * width, -1), nearest[i])
                else:
                    score = self._map_score(queries[i * height * width:(i + 1) * height * width], scores[i],
                                            nearest[i])
                detections.append(Detection(score=score, anomaly_map=anomaly_map))
            start += batch
        return detections

    def _map_score(self, patches: np.ndarray, patch_scores: np.ndarray, nearest: np.ndarray) -> float:
        top = int(patch_scores.argmax())
        score = float(patch_scores[top])
        if self.k > 1:
            score *= reweighting(patches[top], int(nearest[top]), self._bank_array, self._index, self.k)
        return score

    def _anomalib_score(self, patches: torch.Tensor, map_nearest: np.ndarray) -> float:
        """anomalib's image score; each patch's bank row nearest in the map's features bounds its distance."""
        patches = patches.float().cpu()
        upper_sq = (patches - self.score_bank_[torch.from_numpy(map_nearest)]).pow(2).sum(1)
        patch, nearest, distance_sq = top_patch(patches, upper_sq, self.score_bank_, self._score_bank_sq)
        weight = reweighting(patches[patch].numpy(), nearest, self._score_bank_array, self._score_index,
                             ANOMALIB_NEIGHBOURS)
        return float(np.sqrt(max(distance_sq, 0.0)) * weight)

    def save(self, path: str | Path) -> Path:
        """Write the fitted memory bank(s) and the settings that produced them to a .safetensors file."""
        from safetensors.torch import save_file

        if self.memory_bank_ is None:
            raise RuntimeError("PatchCoreDetector is not fitted: nothing to save")
        settings = {"backbone": self.backbone, "weights": str(self.weights) if self.weights else None,
                    "layers": self.layers, "image_size": self.image_size, "coreset_ratio": self.coreset_ratio,
                    "k": self.k, "feature_dim": self.feature_dim,
                    "coreset_projection_dim": self.coreset_projection_dim, "border_pad": self.border_pad,
                    "image_score": self.image_score, "probes": self.probes, "seed": self.seed}
        tensors = {"memory_bank": self.memory_bank_}
        if self.score_bank_ is not None:
            tensors["score_bank"] = self.score_bank_
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": BANK_FORMAT, "settings": json.dumps(settings)})
        return path

    @classmethod
    def load(cls, path: str | Path, weights: str | Path | None = None, batch_size: int = 16,
             device: str | None = "auto", progress: bool = True) -> "PatchCoreDetector":
        """A fitted detector from :meth:`save`'s file; ``weights`` overrides the stored backbone weights path.

        Files written before ``image_score`` existed hold no score bank and load with ``image_score`` "map"."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PatchCore memory bank not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        bank, score_bank = tensors.get("memory_bank"), tensors.get("score_bank")
        if metadata.get("format") != BANK_FORMAT or bank is None:
            raise ValueError(f"{path} is not a PatchCore memory bank written by PatchCoreDetector.save")
        settings = json.loads(metadata["settings"])
        image_score = settings.get("image_score", "map")
        detector = cls(settings["backbone"], weights or settings["weights"], settings["layers"],
                       settings["image_size"], settings["coreset_ratio"], settings["k"], settings["feature_dim"],
                       settings.get("coreset_projection_dim"), batch_size, settings.get("border_pad", 0), image_score,
                       settings.get("probes"), device, settings["seed"], progress)
        if bank.ndim != 2 or bank.shape[1] != detector.feature_size:
            raise ValueError(f"{path} holds features of shape {tuple(bank.shape)} but backbone "
                             f"{settings['backbone']!r} gives {detector.feature_size}-d ones")
        if image_score == "anomalib" and (score_bank is None or score_bank.shape != (bank.shape[0],
                                                                                     sum(detector.extractor.channels))):
            raise ValueError(f"{path} has image_score 'anomalib' but no score bank of "
                             f"{bank.shape[0]}×{sum(detector.extractor.channels)} features")
        detector._set_bank(bank, score_bank)
        return detector
