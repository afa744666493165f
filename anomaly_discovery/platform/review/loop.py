"""The active-discovery review loop (issue 6 item 3): store + FAISS index + embeddings, kept consistent.

State. The store is the truth (classes, proposals, current assignments, decisions). Derived from it, per process:
a mirror of the current assignments (numpy arrays indexed by region id: class, source, embedding id), the class
table, and a :class:`PrototypeIndex` whose ``"region"`` kind holds the embeddings of every member of a known or
confirmed class (the reference set of the k-NN outlier score) and whose ``"prototype"`` kind holds one
prototype per known/confirmed class (mean of its members' embeddings, renormalised; ``proposals.prototype``).
Embeddings live in an append-only :class:`EmbeddingFile` next to the index (``<index>.embeddings.f32``).

Labelling a region embedding and fitting the thresholds: ``labelling``. Unknown model-labelled regions are grouped
into new proposals (``proposals.group_outliers``).

Reviewer actions (confirm, reject, rename, merge, split, move, undo) each run in ONE store transaction that
checks the client's version (``ConflictError`` otherwise), changes classes / proposals / assignments, re-labels
unknown regions now within the threshold of a changed prototype, and records a ``Decision`` whose ``before`` /
``after`` payloads (class and proposal fields with versions, the assignments of every changed region, created
rows) are what ``undo`` restores. Only after the commit is the derived state updated — incrementally, from the
assignment rows newer than the last one seen (``sync``): affected regions are added to / removed from the
reference set, affected prototypes recomputed — and the index saved with that watermark in its metadata.

Crash consistency: on open the mirror is read from the store; an index file whose watermark or model version
differs from the store's is repaired by adding/removing the differing reference ids and recomputing every
prototype ("replayed"), a missing or unreadable one is rebuilt ("rebuilt"). Several processes may share one store
and folder: each write transaction takes a PostgreSQL advisory lock (SQLite serialises writers itself), so
assignment ids commit in order and every process's ``sync`` sees all changes.

The loop's records (settings, inputs, answers) live in ``types``, the assignment mirror and the embeddings path in
``mirror``, the reviewer actions in ``actions``, the coalescing index writer in ``saver``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from anomaly_discovery.platform.review import actions as review
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile
from anomaly_discovery.platform.storage.index import PrototypeIndex, read_index_metadata
from anomaly_discovery.platform.review.labelling import fit_thresholds, label_vectors
from anomaly_discovery.platform.review.mirror import NO_ID, SOURCE_CODE, AssignmentMirror, embeddings_path
from anomaly_discovery.platform.review.types import (ActionResult, ArrivedImage, ClassInfo, DiscoveredImage,
                                                     DiscoveredRegion, IngestedImage, LoopConfig, RegionLabel,
                                                     Thresholds)
from anomaly_discovery.platform.predictor import PredictedImage, RegionPredictor
from anomaly_discovery.platform.review.saver import CoalescingSaver
from anomaly_discovery.platform.review.proposals import ProposalConfig, normalise_rows, prototype
from anomaly_discovery.platform.storage.store import (NewAssignment, NewImage, NewRegion, Store, active_model_version,
                                                      add_images, add_model_version, add_regions, get_or_create_dataset,
                                                      get_or_create_product, known_class_id, set_assignments)
from anomaly_discovery.platform.review.actions import (LIVE, REFERENCE, ChangeSet, InvalidActionError, LoopError,
                                                       NotFoundError, propose_rows, serialise_writes)
from anomaly_discovery.platform.storage.models import (Assignment, AssignmentSource, ClassStatus, Decision, DefectClass,
                                                       Image, ModelVersion, Proposal, ProposalStatus, Region)

__all__ = ["DiscoveryLoop", "InvalidActionError", "LoopError", "NotFoundError"]
logger = logging.getLogger(__name__)


class DiscoveryLoop:
    """Store + index + embeddings of one product line; see the module docstring. Thread-safe (one lock)."""

    def __init__(self, store: Store, index_path: str | Path, dim: int, config: LoopConfig | None = None):
        self.store, self.index_path, self.dim = store, Path(index_path), int(dim)
        self.config = config or LoopConfig()
        self.embeddings = EmbeddingFile(embeddings_path(self.index_path), self.dim)
        self.lock = threading.RLock()
        self.mirror = AssignmentMirror()
        self.classes: dict[int, ClassInfo] = {}
        self.open_proposals: dict[int, int] = {}
        self.centroids: dict[int, np.ndarray] = {}
        self.thresholds = Thresholds()
        self.model_version = "none"
        self._assignment_mark = 0
        self._decision_mark = 0
        self.saver = CoalescingSaver(self.save_index, self.lock, self.config.background_save, self.config.save_delay_s)
        self.recovery = self._open()

    # ---------------------------------------------------------------- derived state
    def _read_store(self, session: Session, since: int) -> tuple[list, list, dict[int, int], int, int, str]:
        rows = session.execute(
            select(Assignment.region_id, Assignment.class_id, Assignment.source, Region.embedding_id)
            .join(Region, Region.id == Assignment.region_id)
            .where(Assignment.is_current.is_(True), Assignment.id > since)).all()
        classes = session.execute(select(DefectClass.id, DefectClass.name, DefectClass.status, DefectClass.version,
                                         DefectClass.parent_id, DefectClass.merged_into_id)).all()
        proposals = dict(session.execute(select(Proposal.class_id, Proposal.id)
                                         .where(Proposal.status == ProposalStatus.OPEN)).all())
        assignment_mark = session.scalar(select(func.max(Assignment.id))) or 0
        decision_mark = session.scalar(select(func.max(Decision.id))) or 0
        active = active_model_version(session)
        return rows, classes, proposals, assignment_mark, decision_mark, active.name if active else "none"

    def _apply_rows(self, rows: list) -> np.ndarray:
        if not rows:
            return np.zeros(0, np.int64)
        region_ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        class_ids = np.fromiter((NO_ID if r[1] is None else r[1] for r in rows), np.int64, len(rows))
        sources = np.fromiter((SOURCE_CODE[AssignmentSource(r[2])] for r in rows), np.int8, len(rows))
        embedding_ids = np.fromiter((NO_ID if r[3] is None else r[3] for r in rows), np.int64, len(rows))
        self.mirror.set(region_ids, class_ids, sources, embedding_ids)
        return region_ids

    def _reference_class_ids(self) -> np.ndarray:
        return np.fromiter((c.id for c in self.classes.values() if c.status in REFERENCE), np.int64)

    def _reconcile_regions(self, region_ids: np.ndarray | None) -> None:
        """Add to / remove from the reference set the given regions (all when ``None``) as their class says."""
        mirror = self.mirror
        if region_ids is None:
            region_ids = np.flatnonzero(mirror.source != NO_ID)
        embedding_ids = mirror.embedding_id[region_ids]
        should = np.isin(mirror.class_id[region_ids], self._reference_class_ids()) & (embedding_ids >= 0)
        present = np.isin(embedding_ids, self.index.ids("region"))
        self.index.remove(embedding_ids[present & ~should], kind="region")
        adding = np.unique(embedding_ids[should & ~present])
        if adding.size:
            self.index.add(adding, self.embeddings.get(adding), kind="region")

    def _recompute_centres(self, class_ids) -> None:
        for class_id in class_ids:
            info = self.classes.get(int(class_id))
            members = self.mirror.members(int(class_id))
            embedding_ids = self.mirror.embedding_id[members]
            embedding_ids = embedding_ids[embedding_ids >= 0]
            if info is None or info.status not in LIVE or embedding_ids.size == 0:
                self.centroids.pop(int(class_id), None)
                self.index.remove([int(class_id)], kind="prototype")
                continue
            centre = prototype(self.embeddings.get(embedding_ids))
            self.centroids[info.id] = centre
            if info.status in REFERENCE:
                self.index.add([info.id], centre[None], kind="prototype", replace=True)
            else:
                self.index.remove([info.id], kind="prototype")

    def _set_classes(self, rows: list, proposals: dict[int, int]) -> set[int]:
        """Replace the class table; returns ids whose status changed (or that appeared / vanished)."""
        new = {r[0]: ClassInfo(r[0], r[1], ClassStatus(r[2]), r[3], r[4], r[5]) for r in rows}
        changed = {i for i in new.keys() | self.classes.keys()
                   if i not in new or i not in self.classes or new[i].status != self.classes[i].status}
        self.classes, self.open_proposals = new, proposals
        return changed

    def _open(self) -> str:
        with self.store.session() as session:
            rows, classes, proposals, assignment_mark, decision_mark, model = self._read_store(session, 0)
        self._apply_rows(rows)
        self._set_classes(classes, proposals)
        self.model_version = model
        self._assignment_mark, self._decision_mark = assignment_mark, decision_mark
        recovery, extra = "rebuilt", {}
        try:
            metadata = read_index_metadata(self.index_path)
            index, saved_model = PrototypeIndex.load(self.index_path, use_gpu=self.config.use_gpu)
            if index.dim == self.dim and saved_model == model:
                self.index, extra = index, metadata.get("extra", {})
                current = (extra.get("assignment_mark"), extra.get("decision_mark")) == (assignment_mark, decision_mark)
                recovery = "current" if current else "replayed"
        except (OSError, ValueError, KeyError) as exc:
            if self.index_path.exists():
                logger.warning("index %s is unreadable (%s): rebuilding it from the store", self.index_path, exc)
        if recovery == "rebuilt":
            self.index = PrototypeIndex(self.dim, config=self.config.index, use_gpu=self.config.use_gpu)
        self._reconcile_regions(None)
        self._recompute_centres(list(self.classes) + self.index.ids("prototype").tolist())
        saved = extra.get("thresholds")
        self.thresholds = Thresholds(**saved) if recovery != "rebuilt" and saved else self._fit_thresholds()
        if recovery != "current":
            self.save_index()
        logger.info("review loop opened: index %s (%d regions, %d classes)", recovery, self.mirror.count(),
                    len(self.classes))
        return recovery

    def sync(self) -> int:
        """Apply every store change since the last one seen (other processes' too); returns regions updated."""
        with self.lock:
            with self.store.session() as session:
                rows, classes, proposals, assignment_mark, decision_mark, model = self._read_store(
                    session, self._assignment_mark)
            old_classes = self.mirror.class_id.copy()
            region_ids = self._apply_rows(rows)
            status_changed = self._set_classes(classes, proposals)
            inside = region_ids[region_ids < len(old_classes)]
            affected = set(self.mirror.class_id[region_ids].tolist()) | set(old_classes[inside].tolist())
            affected = (affected | status_changed) - {NO_ID}
            status_members = [self.mirror.members(c) for c in status_changed]
            self._reconcile_regions(np.unique(np.concatenate([region_ids, *status_members])))
            self._recompute_centres(sorted(affected))
            self._assignment_mark, self._decision_mark = assignment_mark, decision_mark
            self.model_version = model
            if self.thresholds.knn is None:
                self.thresholds = self._fit_thresholds()
            return len(region_ids)

    def _fit_thresholds(self) -> Thresholds:
        return fit_thresholds(self.mirror, self.embeddings, self.index, self.centroids, self._reference_class_ids(),
                              self.config)

    def proposal_config(self) -> ProposalConfig:
        """The clustering settings with the fitted cut (the configured one before there are known classes)."""
        cut = self.thresholds.cut
        return self.config.proposals if cut is None else dataclasses.replace(self.config.proposals, distance_cut=cut)

    def near_radius(self) -> float:
        """Cosine distance within which a region belongs to a centre (prototype or proposal)."""
        t = self.thresholds.prototype
        return self.config.proposals.distance_cut if t is None else t

    def save_index(self) -> Path:
        """Write the index atomically, tagged with the active model version and the store watermark."""
        with self.lock:
            extra = {"assignment_mark": self._assignment_mark, "decision_mark": self._decision_mark,
                     "thresholds": self.thresholds.__dict__}
            return self.index.save(self.index_path, self.model_version, extra=extra)

    def refresh(self) -> None:
        """``sync``, then checkpoint the index (in the background unless ``background_save`` is off)."""
        with self.lock:
            self.sync()
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the index now, or ask the background saver to (see ``LoopConfig.background_save``)."""
        self.saver.request()

    def flush(self) -> None:
        """Write a pending index checkpoint now (a no-op when the file is current)."""
        self.saver.flush()

    def close(self) -> None:
        """Write the pending checkpoint and stop the background saver."""
        self.saver.close()

    # ---------------------------------------------------------------- labelling
    def label_embeddings(self, vectors: np.ndarray) -> list[RegionLabel]:
        """Label unit embeddings against the current classes and proposals (see the module docstring)."""
        vectors = normalise_rows(vectors) if len(vectors) else np.zeros((0, self.dim), np.float32)
        if len(vectors) == 0:
            return []
        with self.lock:
            return label_vectors(vectors, self.index, self.config.k, self.thresholds, self.classes, self.centroids,
                                 self.open_proposals, self.near_radius())

    def current_label(self, region_id: int, outlier_score: float, similarity: float) -> RegionLabel:
        """The label a stored region has now (its current assignment)."""
        class_id = int(self.mirror.class_id[region_id])
        info = self.classes.get(class_id)
        if info is None:
            return RegionLabel("unknown", "unknown", None, outlier_score, similarity)
        if info.status == ClassStatus.PROPOSED:
            return RegionLabel("new", "new", info.id, outlier_score, similarity)
        return RegionLabel("class", info.name, info.id, outlier_score, similarity)

    # ---------------------------------------------------------------- ingest
    def ingest_discovery(self, images: Sequence[DiscoveredImage], regions: Sequence[DiscoveredRegion],
                         known_classes: Sequence[str] = (), *, model_version: str, artifact_path: str = "",
                         metrics: dict | None = None, product: str | None = None,
                         dataset: str = "discovery") -> list[int]:
        """Load a discovery run: images, regions (+ embeddings), known classes and the model's assignments;
        fit the thresholds, then group the outliers into proposals. Returns the new region ids."""
        keys = {image.key for image in images}
        for region in regions:
            if region.image_key not in keys:
                raise ValueError(f"region {region.box} names image {region.image_key!r}, which is not in images")
            if region.class_name is not None and region.class_name not in known_classes:
                raise ValueError(f"region of {region.image_key!r} has class {region.class_name!r}, not among the "
                                 f"known classes {list(known_classes)}")
        vectors = normalise_rows(np.stack([r.embedding for r in regions])) if regions else None
        with self.lock:
            embedding_ids = self.embeddings.append(vectors) if regions else np.zeros(0, np.int64)
            with self.store.session() as session:
                serialise_writes(session)
                if session.scalar(select(ModelVersion).where(ModelVersion.name == model_version)) is None:
                    add_model_version(session, model_version, artifact_path, metrics)
                target = get_or_create_dataset(session, get_or_create_product(session, product or self.config.product),
                                               dataset)
                image_ids = dict(zip([i.key for i in images], add_images(
                    session, target, [NewImage(i.path, i.content_hash, i.split) for i in images])))
                class_ids = {name: known_class_id(session, name) for name in known_classes}
                region_ids = add_regions(session, [
                    NewRegion(image_ids[r.image_key], tuple(int(v) for v in r.box), r.anomaly_score, r.mask_path,
                              int(e)) for r, e in zip(regions, embedding_ids)])
                set_assignments(session, [
                    NewAssignment(rid, class_ids.get(r.class_name), r.confidence if r.class_name else None)
                    for rid, r in zip(region_ids, regions)], AssignmentSource.MODEL)
            self.sync()
            self.thresholds = self._fit_thresholds()
            self.propose()
            return region_ids

    def ingest_images(self, images: Sequence[ArrivedImage], predictor: RegionPredictor,
                      arrays: Sequence[np.ndarray]) -> list[IngestedImage]:
        """Predict ``arrays`` with ``predictor`` and ingest them (see ``ingest_predictions``)."""
        return self.ingest_predictions(images, predictor.predict(list(arrays)))

    def ingest_predictions(self, images: Sequence[ArrivedImage],
                           predictions: Sequence[PredictedImage]) -> list[IngestedImage]:
        """Store new arrivals and their predicted regions (+ embeddings), label every region (known class,
        an open proposal, or unknown) in the same transaction, then propose new classes from the unknown ones.
        An image whose content hash is already in the arrivals dataset (or earlier in ``images``) is not stored
        again: its existing id is returned with ``duplicate=True``."""
        if len(images) != len(predictions):
            raise ValueError(f"got {len(images)} images for {len(predictions)} predictions")
        with self.lock:
            with self.store.session() as session:
                target = get_or_create_dataset(session, get_or_create_product(session, self.config.product),
                                               self.config.dataset)
                stored = dict(session.execute(select(Image.content_hash, Image.id).where(
                    Image.dataset_id == target.id, Image.content_hash.in_([i.content_hash for i in images]))).all())
            first = {}
            for position, image in enumerate(images):
                first.setdefault(image.content_hash, position)
            fresh = [i for i, image in enumerate(images) if image.content_hash not in stored
                     and first[image.content_hash] == i]
            regions = [(i, r) for i in fresh for r in predictions[i].regions]
            vectors = normalise_rows(np.stack([r.embedding for _, r in regions])) if regions else None
            labels = self.label_embeddings(vectors) if regions else []
            embedding_ids = self.embeddings.append(vectors) if regions else np.zeros(0, np.int64)
            with self.store.session() as session:
                serialise_writes(session)
                target = get_or_create_dataset(session, get_or_create_product(session, self.config.product),
                                               self.config.dataset)
                new_ids = dict(zip(fresh, add_images(session, target, [
                    NewImage(images[i].path, images[i].content_hash, images[i].split) for i in fresh])))
                region_ids = add_regions(session, [
                    NewRegion(new_ids[i], tuple(int(v) for v in r.box), r.anomaly_score, None, int(e))
                    for (i, r), e in zip(regions, embedding_ids)])
                change = ChangeSet(self, session)
                change.register_regions(region_ids, embedding_ids)
                for region_id, label in zip(region_ids, labels):
                    change.assign([region_id], label.class_id, AssignmentSource.MODEL, label.similarity)
                change.finish()
            self.sync()
            if sum(label.kind == "unknown" for label in labels) >= self.config.proposals.min_size:
                self.propose()
            else:
                self.checkpoint()
            per_image: dict[int, list[tuple[int, RegionLabel]]] = {i: [] for i in fresh}
            for (i, _), region_id, label in zip(regions, region_ids, labels):
                per_image[i].append((region_id, self.current_label(region_id, label.outlier_score, label.similarity)))
            results = []
            for i, image in enumerate(images):
                if i in new_ids:
                    results.append(IngestedImage(new_ids[i], [r for r, _ in per_image[i]],
                                                 [lab for _, lab in per_image[i]], False))
                else:
                    image_id = stored.get(image.content_hash) or new_ids[first[image.content_hash]]
                    results.append(IngestedImage(image_id, [], [], True))
            return results

    def propose(self) -> list[int]:
        """Re-label the unknown model-labelled regions and group the remaining outliers into new proposals
        (one store transaction, no reviewer decision). Returns the ids of the proposals created."""
        with self.lock:
            created: list[int] = []
            with self.store.session() as session:
                serialise_writes(session)
                self.sync()
                unknown = self.mirror.unknown()
                if unknown.size:
                    created = propose_rows(ChangeSet(self, session), unknown)
            self.refresh()
            return created

    # ---------------------------------------------------------------- reviewer actions
    def _act(self, action: str, reviewer: str, build) -> ActionResult:
        """One reviewer action: lock, catch up with the store, change + audit in one transaction, then update
        the derived state and save the index."""
        if not reviewer or not reviewer.strip():
            raise InvalidActionError("a reviewer action needs the reviewer's name")
        started = time.perf_counter()
        with self.lock:
            with self.store.session() as session:
                serialise_writes(session)
                self.sync()
                change = ChangeSet(self, session)
                build(change)
                decision = change.finish(action, reviewer.strip())
                result = (decision.id, sorted(change.class_rows), len(change.assigned))
            self.refresh()
        return ActionResult(result[0], action, result[1], result[2], time.perf_counter() - started)

    def confirm(self, proposal_id: int, name: str, *, expected_version: int | None = None,
                reviewer: str = "reviewer") -> ActionResult:
        """Confirm an open proposal as the class ``name``."""
        return self._act("confirm", reviewer, lambda c: review.confirm(c, proposal_id, name, expected_version))

    def reject(self, proposal_id: int, *, expected_version: int | None = None,
               reviewer: str = "reviewer") -> ActionResult:
        """Reject an open proposal; its regions go back to unassigned."""
        return self._act("reject", reviewer, lambda c: review.reject(c, proposal_id, expected_version))

    def rename(self, class_id: int, name: str, *, expected_version: int | None = None,
               reviewer: str = "reviewer") -> ActionResult:
        return self._act("rename", reviewer, lambda c: review.rename(c, class_id, name, expected_version))

    def merge(self, source_id: int, target_id: int, *, expected_version: int | None = None,
              target_version: int | None = None, reviewer: str = "reviewer") -> ActionResult:
        """Merge class ``source_id`` into ``target_id``."""
        return self._act("merge", reviewer,
                         lambda c: review.merge(c, source_id, target_id, expected_version, target_version))

    def merge_proposal(self, proposal_id: int, target_id: int, *, expected_version: int | None = None,
                       target_version: int | None = None, reviewer: str = "reviewer") -> ActionResult:
        """Fold an open proposal into the existing class ``target_id``."""
        return self._act("merge", reviewer, lambda c: review.merge_proposal(c, proposal_id, target_id,
                                                                             expected_version, target_version))

    def split(self, class_id: int, k: int, *, expected_version: int | None = None,
              reviewer: str = "reviewer") -> ActionResult:
        """Split a class into ``k`` parts by k-means on its members' embeddings."""
        return self._act("split", reviewer, lambda c: review.split(c, class_id, int(k), expected_version))

    def move(self, region_ids: Sequence[int], class_id: int | None, *, expected_version: int | None = None,
             reviewer: str = "reviewer") -> ActionResult:
        """Move single regions to ``class_id`` (``None``: unassigned)."""
        return self._act("move", reviewer, lambda c: review.move(c, list(region_ids), class_id, expected_version))

    def undo(self, *, reviewer: str = "reviewer") -> ActionResult:
        """Undo the newest reviewer action not yet undone."""
        return self._act("undo", reviewer, review.undo)

    # ---------------------------------------------------------------- reads
    def class_sizes(self) -> dict[int, int]:
        with self.lock:
            assigned = self.mirror.class_id[self.mirror.class_id >= 0]
            ids, counts = np.unique(assigned, return_counts=True)
            return dict(zip(ids.tolist(), counts.tolist()))

    def list_proposals(self, statuses: Sequence[ProposalStatus] = (ProposalStatus.OPEN,)) -> list[Proposal]:
        with self.store.session() as session:
            return list(session.scalars(select(Proposal).where(Proposal.status.in_(list(statuses)))
                                        .order_by(Proposal.id)))
