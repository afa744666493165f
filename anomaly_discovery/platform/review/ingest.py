"""Loading regions into the review loop: ``DiscoveryLoop.ingest_discovery`` and ``ingest_predictions``.

A discovery run: its images and regions (with the run's embeddings) enter the store in one transaction. Where the
discovery model assigned them (``DiscoveredRegion.cluster``) its assignment is the first one: each novel cluster
becomes a proposed class ``novel_<i>``, with an open proposal when it has member regions (the proposals are the
discovered classes; a cluster that only an image's merged label names has none), ``model_classes`` records which
class each cluster stands for, every region the model put in a cluster and not over its outlier threshold is a
member, the model's outliers are unassigned (``unknown``), and each image keeps the model's image class; more of
the same run later joins the classes its clusters already stand for. Regions named by a known class go to it; without clusters the unknown regions are grouped into proposals by the loop
(``propose``). A store serves one model's embeddings: a run of another model is refused (activate that model
instead, ``platform/review/activation.py``).

New arrivals: stored and labelled (the model's class where it gives one, else the index's label, see
``labelling``) in one transaction; refused with :class:`ModelChangedError` when the store's active model is no
longer the one the loop opened with (their embeddings belong to the old model's space: send them again).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from sqlalchemy import select

from anomaly_discovery.platform.predictor import PredictedImage
from anomaly_discovery.platform.review.actions import ChangeSet, LoopError, serialise_writes
from anomaly_discovery.platform.review.mirror import NO_MODEL
from anomaly_discovery.platform.review.proposals import normalise_rows
from anomaly_discovery.platform.review.types import (ArrivedImage, DiscoveredImage, DiscoveredRegion, IngestedImage,
                                                     RegionLabel, ReviewContext, Thresholds)
from anomaly_discovery.platform.storage.models import (AssignmentSource, ClassStatus, DefectClass, Image, ModelClass,
                                                       ModelVersion)
from anomaly_discovery.platform.storage.store import (NewImage, NewRegion, Store, active_model_version, add_images,
                                                      add_model_version, add_regions, get_or_create_dataset,
                                                      get_or_create_product, known_class_id)


class IngestTarget(ReviewContext, Protocol):
    """What ingesting needs of the loop (``DiscoveryLoop`` is one)."""

    store: Store
    lock: threading.RLock
    model_version: str
    thresholds: Thresholds

    def use_model(self, model_version: str) -> None: ...

    def sync(self) -> int: ...

    def fit_thresholds(self) -> Thresholds: ...

    def refresh(self) -> None: ...

    def propose(self) -> list[int]: ...

    def checkpoint(self) -> None: ...

    def label_predictions(self, regions: Sequence) -> list[RegionLabel]: ...

    def current_label(self, region_id: int, outlier_score: float, similarity: float) -> RegionLabel: ...


class ModelChangedError(LoopError):
    """The store's active model changed while a request ran: its embeddings are of the old model."""


def active_name(session) -> str:
    active = active_model_version(session)
    return active.name if active is not None else NO_MODEL


def check_run(images: Sequence[DiscoveredImage], regions: Sequence[DiscoveredRegion],
              known_classes: Sequence[str]) -> None:
    keys = {image.key for image in images}
    for region in regions:
        if region.image_key not in keys:
            raise ValueError(f"region {region.box} names image {region.image_key!r}, which is not in images")
        if region.class_name is not None and region.class_name not in known_classes:
            raise ValueError(f"region of {region.image_key!r} has class {region.class_name!r}, not among the "
                             f"known classes {list(known_classes)}")


def is_member(region: DiscoveredRegion) -> bool:
    """A region the discovery model put in one of its clusters, not over its outlier threshold."""
    return region.class_name is None and region.cluster is not None and not region.is_outlier


def ingest_discovery(loop: IngestTarget, images: Sequence[DiscoveredImage], regions: Sequence[DiscoveredRegion],
                     known_classes: Sequence[str], model_version: str, artifact_path: str, metrics: dict | None,
                     product: str, dataset: str) -> list[int]:
    """See the module docstring; returns the new region ids."""
    check_run(images, regions, known_classes)
    vectors = normalise_rows(np.stack([r.embedding for r in regions])) if regions else None
    with loop.lock:
        loop.use_model(model_version)
        embedding_ids = loop.embeddings.append(vectors) if regions else np.zeros(0, np.int64)
        with loop.store.session() as session:
            serialise_writes(session)
            if active_name(session) not in (NO_MODEL, model_version):
                raise ValueError(f"the store serves model {active_name(session)!r}: a run of model {model_version!r} "
                                 "needs that model activated first (its regions re-embedded), or a new work folder")
            model = (session.scalar(select(ModelVersion).where(ModelVersion.name == model_version))
                     or add_model_version(session, model_version, artifact_path, metrics))
            change = ChangeSet(loop, session)
            mapped = dict(session.execute(select(ModelClass.cluster, ModelClass.class_id)
                                          .where(ModelClass.model_version_id == model.id)).all())
            classes, created = {}, set()
            clusters = {r.cluster for r in regions if is_member(r)} | {i.cluster for i in images}
            for cluster in sorted(clusters - {None}):
                if cluster in mapped:
                    if mapped[cluster] is not None:
                        classes[cluster] = session.get(DefectClass, mapped[cluster])
                    continue
                classes[cluster] = change.add_class(f"novel_{cluster}", ClassStatus.PROPOSED)
                created.add(cluster)
                session.add(ModelClass(model_version_id=model.id, cluster=cluster, class_id=classes[cluster].id))
            target = get_or_create_dataset(session, get_or_create_product(session, product), dataset)
            image_ids = dict(zip([i.key for i in images], add_images(session, target, [
                NewImage(i.path, i.content_hash, i.split, model_class_id=classes[i.cluster].id
                         if i.cluster in classes else None) for i in images])))
            known = {name: known_class_id(session, name) for name in known_classes}
            region_ids = add_regions(session, [
                NewRegion(image_ids[r.image_key], tuple(int(v) for v in r.box), r.anomaly_score, r.mask_path, int(e))
                for r, e in zip(regions, embedding_ids)])
            change.register_regions(region_ids, embedding_ids)
            for region_id, region in zip(region_ids, regions):
                class_id = known[region.class_name] if region.class_name is not None else (
                    classes[region.cluster].id if is_member(region) and region.cluster in classes else None)
                change.assign([region_id], class_id, AssignmentSource.MODEL,
                              region.confidence if class_id is not None else None)
            for cluster in sorted(created):
                members = np.array([rid for rid, r in zip(region_ids, regions)
                                    if is_member(r) and r.cluster == cluster], np.int64)
                if members.size:
                    change.add_proposal(classes[cluster], members)
            change.finish()
        loop.sync()
        loop.thresholds = loop.fit_thresholds()
        if any(r.cluster is not None for r in regions):
            loop.refresh()
        else:
            loop.propose()
        return region_ids


def ingest_predictions(loop: IngestTarget, images: Sequence[ArrivedImage],
                       predictions: Sequence[PredictedImage]) -> list[IngestedImage]:
    """Store new arrivals and their predicted regions (+ embeddings), label every region (the model's class, a
    known class, an open proposal, or unknown) in the same transaction, then propose new classes from the unknown
    ones. An image whose content hash is already in the arrivals dataset (or earlier in ``images``) is not stored
    again: its existing id is returned with ``duplicate=True``."""
    if len(images) != len(predictions):
        raise ValueError(f"got {len(images)} images for {len(predictions)} predictions")
    config = loop.config
    with loop.lock:
        with loop.store.session() as session:
            target = get_or_create_dataset(session, get_or_create_product(session, config.product), config.dataset)
            stored = dict(session.execute(select(Image.content_hash, Image.id).where(
                Image.dataset_id == target.id, Image.content_hash.in_([i.content_hash for i in images]))).all())
        first = {}
        for position, image in enumerate(images):
            first.setdefault(image.content_hash, position)
        fresh = [i for i, image in enumerate(images)
                 if image.content_hash not in stored and first[image.content_hash] == i]
        regions = [(i, r) for i in fresh for r in predictions[i].regions]
        labels = loop.label_predictions([r for _, r in regions])
        vectors = normalise_rows(np.stack([r.embedding for _, r in regions])) if regions else None
        embedding_ids = loop.embeddings.append(vectors) if regions else np.zeros(0, np.int64)
        with loop.store.session() as session:
            serialise_writes(session)
            if active_name(session) != loop.model_version:
                raise ModelChangedError(f"the served model changed to {active_name(session)!r} while this request "
                                        f"ran on {loop.model_version!r}: nothing was stored, send the images again")
            target = get_or_create_dataset(session, get_or_create_product(session, config.product), config.dataset)
            new_ids = dict(zip(fresh, add_images(session, target, [
                NewImage(images[i].path, images[i].content_hash, images[i].split) for i in fresh])))
            region_ids = add_regions(session, [
                NewRegion(new_ids[i], tuple(int(v) for v in r.box), r.anomaly_score, None, int(e))
                for (i, r), e in zip(regions, embedding_ids)])
            change = ChangeSet(loop, session)
            change.register_regions(region_ids, embedding_ids)
            for region_id, label in zip(region_ids, labels):
                change.assign([region_id], label.class_id, AssignmentSource.MODEL, label.similarity)
            change.finish()
        loop.sync()
        if sum(label.kind == "unknown" for label in labels) >= config.proposals.min_size:
            loop.propose()
        else:
            loop.checkpoint()
        per_image: dict[int, list[tuple[int, RegionLabel]]] = {i: [] for i in fresh}
        for (i, _), region_id, label in zip(regions, region_ids, labels):
            per_image[i].append((region_id, loop.current_label(region_id, label.outlier_score, label.similarity)))
        results = []
        for i, image in enumerate(images):
            if i in new_ids:
                results.append(IngestedImage(new_ids[i], [r for r, _ in per_image[i]],
                                             [lab for _, lab in per_image[i]], False))
            else:
                results.append(IngestedImage(stored.get(image.content_hash) or new_ids[first[image.content_hash]],
                                             [], [], True))
        return results
