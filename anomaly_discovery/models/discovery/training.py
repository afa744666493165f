"""Discovery training (methods.md §1 steps 5–7, §2): AMGA backbone + projector + multi-head cosine prototypes.

``train_discovery(config, novel, base)`` is a plain function (no globals; Ray Train wraps it through
:class:`TrainHooks`). Every epoch draws two views of each crop, balances base and novel crops 50/50 when a base
set is given, and minimises ``total_discovery_loss`` (SupCon + CE on base crops; InfoNCE, cross-view
self-distillation with the teacher-temperature staircase, mean-entropy and prototype separation on novel crops;
base columns masked in the teacher; optional pseudo-label correction by region score). The head with the
lowest mean cluster loss in the last epoch is kept.

Speed: when the patch embedding is frozen (the hybrid with ``trainable_cnn_stages=0``) the CNN feature map of
``cached_views`` views per crop is computed once (view 0 un-augmented, the others paired augmentations) and
every step trains the transformer and heads on a random pair of cached views (``forward_features``,
identical to the full forward on the same view).

Reproducibility: each epoch's sampling and augmentation come from a generator seeded by (seed, epoch), so a
run resumed from its epoch checkpoint (safetensors weights, optimizer state read with ``weights_only=True``,
JSON history) ends with exactly the same weights as an uninterrupted one.

After training (``train_discovery``): unit embeddings of every novel crop, the best head's prototypes (with
``k="auto"``: K estimated on the embeddings and the novel prototypes replaced by k-means centres), assignments
and confidences, image labels by area-weighted merging, kNN / energy outlier scores with the threshold that
accepts 95% of held-out base crops, and metrics that read no label of the discovered images.

The parts live beside this training loop: settings in ``discovery_config``, the network in ``discovery_model``
(backbones in ``discovery_net``), tensors / view cache / epoch plan in ``discovery_data``, epoch checkpoints in
``discovery_checkpoints``, and embedding, scoring, merging and the saved predictor in ``discovery_predict``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from .augment import augment_views
from ..features.backbones import autocast_for, resolve_device
from .class_count import ClassCountEstimate, estimate_class_count
from .checkpoints import resume_history, save_checkpoint
from .config import DiscoveryConfig, OptimisationSettings
from .data import RegionTensors, ViewCache, build_view_cache, epoch_plan, split_base
from .model import DiscoveryModel, build_model, normalise_images
from .frozen import ImageSource
from .hooks import TrainHooks
from .losses import (DiscoveryLossWeights, hard_label_ratio_schedule, teacher_temperature_schedule,
                     total_discovery_loss)
from .predict import (DiscoveryArtifacts, DiscoveryPredictor, RegionPredictions, assemble_artifacts, embed,
                      score_embeddings)
from ..localisation.regions import Region
from .view_discovery import embed_view_regions, train_view_discovery


def learning_rate(settings: OptimisationSettings, step: int, total_steps: int) -> float:
    """Cosine schedule from ``lr`` to ``lr·min_lr_ratio`` over all steps."""
    low = settings.lr * settings.min_lr_ratio
    return low + 0.5 * (settings.lr - low) * (1 + math.cos(math.pi * step / max(1, total_steps)))


def build_optimizer(model: nn.Module, settings: OptimisationSettings) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters; no weight decay on biases, norms and tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    return torch.optim.AdamW(groups, lr=settings.lr)


@dataclass
class TrainedModel:
    """What the training loop hands to the results stage."""

    model: DiscoveryModel
    classes: list[str]
    data: RegionTensors
    cache: Optional[ViewCache]
    n_novel: int
    n_base_train: int
    history: list[dict]
    seconds: float


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, data: RegionTensors,
                 cache: Optional[ViewCache], config: DiscoveryConfig, epoch: int, step: int, total_steps: int,
                 n_base: int, device: torch.device) -> tuple[dict, int]:
    settings = config.optimisation
    generator = torch.Generator().manual_seed(config.runtime.seed * 100_003 + epoch + 7)
    weights = DiscoveryLossWeights(settings.supervised_weight, settings.entropy_weight, settings.separation_weight)
    tau_t = teacher_temperature_schedule(epoch, settings.epochs, *settings.teacher_temperature,
                                         n_values=min(10, max(1, round(0.8 * settings.epochs))))
    ratio = 0.0 if settings.hard_label_start is None else hard_label_ratio_schedule(epoch, settings.epochs,
                                                                                       settings.hard_label_start)
    sums: dict[str, float] = {}
    cluster_sum, novel_count, n_batches = None, 0, 0
    model.train()
    for (plan,) in loader:
        plan = plan.cpu()
        index = plan[:, 0]
        if cache is not None:
            first, second = cache.views(index, plan[:, 1], device), cache.views(index, plan[:, 2], device)
            inputs, maps, masks = (torch.cat([a, b]) for a, b in zip(first, second))
        else:
            images, anomaly, objects = data.floats(index, torch.device("cpu"))
            views = [augment_views(images, anomaly, objects, generator, settings.augment) for _ in range(2)]
            inputs, maps, masks = (torch.cat([a, b]).to(device) for a, b in zip(*views))
            inputs = normalise_images(inputs)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, total_steps)
        with autocast_for(device):
            _, projections, logits, prototypes = model(inputs, maps, masks, from_cnn_features=cache is not None)
        parts = total_discovery_loss(
            projections.float(), logits.float(), data.labels[index].to(device), n_base, tau_t,
            prototypes=prototypes.float(), region_scores=data.scores[index].to(device), weights=weights,
            student_temperature=config.model.temperature, pseudo_label_correction=settings.pseudo_label_correction,
            hard_label_ratio=ratio)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        step += 1
        n_batches += 1
        for key in ("total", "rep", "rep_base", "cls_base", "cls_novel", "reg_novel", "sep"):
            sums[key] = sums.get(key, 0.0) + parts[key].item()
        novel = int(parts["n_novel"])
        weighted = parts["cluster_per_head"].cpu().double() * novel
        cluster_sum = weighted if cluster_sum is None else cluster_sum + weighted
        novel_count += novel
    metrics = {key: value / max(1, n_batches) for key, value in sums.items()}
    metrics["cluster_per_head"] = (cluster_sum / max(1, novel_count)).tolist() if cluster_sum is not None else []
    metrics.update(teacher_temperature=tau_t, lr=learning_rate(settings, step, total_steps), batches=n_batches)
    return metrics, step


def _check_inputs(novel: Sequence[Region], base: Optional[Sequence[Region]]) -> None:
    if not novel:
        raise ValueError("train_discovery needs at least one novel region")
    if any(r.is_base for r in novel):
        raise ValueError("novel regions must not carry a class_name (their labels are never used)")
    if base and any(not r.is_base for r in base):
        raise ValueError("every base region needs its class_name")


def fit_discovery_model(config: DiscoveryConfig, novel: Sequence[Region], base: Sequence[Region],
                        hooks: TrainHooks, report_fn: Optional[Callable] = None) -> TrainedModel:
    """The training loop: data tensors, view cache, epochs with checkpoints, resume, head selection."""
    started = time.perf_counter()
    settings, runtime = config.optimisation, config.runtime
    device = resolve_device(runtime.device)
    base_train, base_val = split_base(base, settings.base_val_fraction, runtime.seed)
    classes = sorted({r.class_name for r in base})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(runtime.seed)
        model = build_model(config.model, len(classes) + config.n_novel_prototypes).to(device)
    regions = list(novel) + base_train + base_val
    data = RegionTensors.build(regions, config.model.image_size, classes)
    cache = None
    if config.uses_cache:
        cache = build_view_cache(model.backbone, data, settings.cached_views, config, device)
    optimizer = build_optimizer(model, settings)
    checkpoint_dir = Path(runtime.checkpoint_dir) if runtime.checkpoint_dir else None
    fingerprint = config.fingerprint() | {"n_novel": len(novel), "n_base": len(base)}
    history = resume_history(checkpoint_dir, model, optimizer, fingerprint) if runtime.resume else []
    wrapped = hooks.wrap_model(model)
    if runtime.compile and device.type == "cuda":
        wrapped = torch.compile(wrapped)
    steps_per_epoch = None
    bar = tqdm(range(len(history), settings.epochs), desc="discovery", unit="epoch", disable=not runtime.progress)
    for epoch in bar:
        epoch_started = time.perf_counter()
        plan = epoch_plan(len(novel), len(base_train), settings.cached_views if cache is not None else 0,
                          runtime.seed, epoch)
        loader = hooks.wrap_loader(DataLoader(TensorDataset(plan), batch_size=settings.batch_size, shuffle=False,
                                              drop_last=len(plan) >= 2 * settings.batch_size))
        steps_per_epoch = steps_per_epoch or len(loader)
        metrics, _ = _train_epoch(wrapped, loader, optimizer, data, cache, config, epoch, epoch * steps_per_epoch,
                                  settings.epochs * steps_per_epoch, len(classes), device)
        metrics.update(epoch=epoch, seconds=time.perf_counter() - epoch_started)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['total']:.3f}")
        saved = None
        if checkpoint_dir is not None and hooks.save_checkpoints:
            saved = save_checkpoint(checkpoint_dir, epoch, model, optimizer,
                                    {"fingerprint": fingerprint, "history": history}, runtime.keep_checkpoints)
        for callback in (hooks.report, report_fn):
            if callback is not None:
                callback(epoch, metrics, saved)
    if history and history[-1]["cluster_per_head"]:
        model.head.select_best_head(history[-1]["cluster_per_head"])
    model.eval()
    return TrainedModel(model, classes, data, cache, len(novel), len(base_train), history,
                        time.perf_counter() - started)


@torch.no_grad()
def predict_regions(artifacts: "DiscoveryArtifacts | DiscoveryPredictor", regions: Sequence[Region],
                    images: Optional[Mapping[str, ImageSource]] = None) -> RegionPredictions:
    """Label new regions with a trained model: cluster, confidence, outlier scores. View models read the regions'
    whole images from ``images`` (image id → array or path)."""
    predictor = artifacts.predictor if isinstance(artifacts, DiscoveryArtifacts) else artifacts
    if not regions:
        raise ValueError("predict_regions: no regions")
    if predictor.config.model.uses_views:
        if images is None:
            raise ValueError(f"a {predictor.config.model.kind} discovery model needs the regions' whole images")
        embeddings = embed_view_regions(predictor.model, predictor.view_extractor(), regions, images,
                                        predictor.config.model.view_size, predictor.config.model.image_turns)
        return score_embeddings(predictor, embeddings)
    device = next(predictor.model.parameters()).device
    data = RegionTensors.build([dataclasses.replace(r, class_name=None) for r in regions],
                               predictor.config.model.image_size, predictor.base_classes)
    embeddings = embed(predictor.model, data, torch.arange(len(regions)), None, device)
    return score_embeddings(predictor, embeddings)


def novel_prototypes(trained: TrainedModel, embeddings: np.ndarray, config: DiscoveryConfig
                     ) -> tuple[torch.Tensor, Optional[ClassCountEstimate]]:
    """The best head's prototypes, base first. With ``assign="kmeans"`` (or ``k="auto"``, which estimates K on
    the embeddings first) the novel prototypes are the unit k-means centres of the novel embeddings."""
    prototypes = trained.model.head.prototypes()[int(trained.model.head.best_head)].detach().cpu()
    n_base = len(trained.classes)
    estimate = None
    k, classes, seed = config.n_novel_prototypes, config.classes, config.runtime.seed
    if classes.k == "auto":
        k_max = min(classes.k_max, len(embeddings) - 1)
        estimate = (ClassCountEstimate(1, {1: 0.0}, classes.k_method) if k_max < 2 else
                    estimate_class_count(embeddings, k_min=2, k_max=k_max, method=classes.k_method, seed=seed,
                                         prototypes=prototypes[n_base:].numpy(), temperature=config.model.temperature))
        k = estimate.k
    elif classes.assign == "head" or k > len(embeddings):
        return prototypes, None
    centres = KMeans(k, n_init=10, random_state=seed).fit(embeddings).cluster_centers_
    novel = F.normalize(torch.from_numpy(centres).float(), dim=-1)
    return torch.cat([prototypes[:n_base], novel]), estimate


def label_free_metrics(trained: TrainedModel, predictions: RegionPredictions, val_embeddings: torch.Tensor,
                       val_scores: np.ndarray, threshold: Optional[float]) -> dict:
    """Metrics that read no label of the discovered images: final losses, base validation accuracy, silhouette."""
    last = trained.history[-1] if trained.history else {}
    metrics: dict[str, Any] = {"loss": last.get("total"), "cluster_loss_per_head": last.get("cluster_per_head"),
                               "best_head": int(trained.model.head.best_head), "train_seconds": trained.seconds,
                               "n_novel": trained.n_novel, "n_base_train": trained.n_base_train,
                               "n_base_val": len(val_embeddings),
                               "n_clusters_used": int(len(np.unique(predictions.clusters)))}
    if len(val_embeddings):
        head = trained.model.head.head_logits(val_embeddings)[:, :len(trained.classes)]
        val_labels = trained.data.labels[trained.n_novel + trained.n_base_train:]
        metrics["base_val_accuracy"] = float((head.argmax(1) == val_labels).float().mean())
        metrics["outlier_threshold"] = threshold
        metrics["base_val_accept_rate"] = float((val_scores <= threshold).mean())
    used = metrics["n_clusters_used"]
    if 2 <= used < len(predictions.clusters):
        metrics["silhouette"] = float(silhouette_score(predictions.embeddings, predictions.clusters, metric="cosine"))
    return metrics


def train_discovery(config: DiscoveryConfig, novel: Sequence[Region], base: Optional[Sequence[Region]] = None,
                    report_fn: Optional[Callable[[int, dict, Optional[Path]], None]] = None,
                    hooks: Optional[TrainHooks] = None, images: Optional[Mapping[str, ImageSource]] = None,
                    normal_images: Sequence[ImageSource] = ()) -> DiscoveryArtifacts:
    """Discover classes in ``novel`` regions (their labels are never read) with, optionally, labelled ``base``
    regions; then embed, assign, merge per image and score outliers. View models (``kind`` "learned" or
    "frozen") also read every region's whole image from ``images`` (image id → array or path) and, when given,
    defect-free ``normal_images``. ``report_fn(epoch, metrics, checkpoint_dir)`` is called after every epoch."""
    _check_inputs(novel, base)
    if config.model.uses_views:
        if images is None:
            raise ValueError(f"{config.model.kind} discovery needs the whole image of every region (images=...)")
        return train_view_discovery(config, novel, list(base or []), images, normal_images, report_fn, hooks)
    trained = fit_discovery_model(config, novel, list(base or []), hooks or TrainHooks(), report_fn)
    device = next(trained.model.parameters()).device
    n_train = trained.n_novel + trained.n_base_train
    all_embeddings = embed(trained.model, trained.data, torch.arange(len(trained.data.labels)), trained.cache, device)
    novel_embeddings = all_embeddings[:trained.n_novel]
    prototypes, estimate = novel_prototypes(trained, novel_embeddings.numpy(), config)
    artifacts = assemble_artifacts(config, trained.model.cpu(), trained.classes, novel, all_embeddings, n_train,
                                   prototypes, estimate, trained.history)
    artifacts.metrics |= label_free_metrics(trained, artifacts.regions, all_embeddings[n_train:],
                                            artifacts.metrics.pop("val_scores"), artifacts.predictor.outlier_threshold)
    return artifacts
