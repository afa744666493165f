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
from anomaly_discovery.platform.review import ingest
from anomaly_discovery.platform.review.labelling import fit_thresholds, label_by_model, label_vectors, live_class
from anomaly_discovery.platform.review.mirror import NO_ID, NO_MODEL, SOURCE_CODE, AssignmentMirror, embeddings_path
from anomaly_discovery.platform.review.types import (ActionResult, ArrivedImage, ClassInfo, DiscoveredImage,
                                                     DiscoveredRegion, IngestedImage, LoopConfig, RegionLabel,
                                                     Thresholds)
from anomaly_discovery.platform.predictor import PredictedImage, PredictedRegion, RegionPredictor
from anomaly_discovery.platform.review.saver import CoalescingSaver
from anomaly_discovery.platform.review.proposals import ProposalConfig, normalise_rows, prototype
from anomaly_discovery.platform.storage.store import Store, active_model_version
from anomaly_discovery.platform.review.actions import (LIVE, REFERENCE, ChangeSet, InvalidActionError, LoopError,
                                                       NotFoundError, propose_rows, serialise_writes)
from anomaly_discovery.platform.review.ingest import ModelChangedError
from anomaly_discovery.platform.storage.models import (Assignment, AssignmentSource, ClassStatus, Decision, DefectClass,
                                                       Image, ModelClass, Proposal, ProposalStatus, Region)

__all__ = ["DiscoveryLoop", "InvalidActionError", "LoopError", "ModelChangedError", "NotFoundError"]
logger = logging.getLogger(__name__)


class DiscoveryLoop:
    """Store + index + embeddings of one product line; see the module docstring. Thread-safe (one lock)."""

    def __init__(self, store: Store, index_path: str | Path, dim: int, config: LoopConfig | None = None,
                 model_version: str | None = None, served_index: str | Path | None = None):
        """``model_version`` (default: the store's active one) names whose embeddings the loop works with; another
        than the active one, with the ``served_index`` whose embeddings to read, builds a new index at
        ``index_path`` beside the served one (``platform/review/activation.py``)."""
        self.store, self.index_path, self.dim = store, Path(index_path), int(dim)
        self.config = config or LoopConfig()
        self.model_version = model_version or self.store_model()
        self.pinned = model_version is not None
        self.stale = False
        self.embeddings = EmbeddingFile(embeddings_path(served_index or self.index_path, self.model_version), self.dim)
        self.model_classes: dict[int, int | None] = {}
        self.lock = threading.RLock()
        self.mirror = AssignmentMirror()
        self.classes: dict[int, ClassInfo] = {}
        self.open_proposals: dict[int, int] = {}
        self.centroids: dict[int, np.ndarray] = {}
        self.thresholds = Thresholds()
        self._assignment_mark = 0
        self._decision_mark = 0
        self.saver = CoalescingSaver(self.save_index, self.lock, self.config.background_save, self.config.save_delay_s)
        self.recovery = self._open()

    # ---------------------------------------------------------------- derived state
    def store_model(self) -> str:
        """The name of the store's active model version (``"none"`` without one)."""
        with self.store.session() as session:
            return ingest.active_name(session)

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
        name = active.name if active else NO_MODEL
        if name == self.model_version and active is not None:
            self.model_classes = dict(session.execute(select(ModelClass.cluster, ModelClass.class_id).where(
                ModelClass.model_version_id == active.id)).all())
        return rows, classes, proposals, assignment_mark, decision_mark, name

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
        self._check_embeddings()
        self._set_classes(classes, proposals)
        self._note_model(model)
        self._assignment_mark, self._decision_mark = assignment_mark, decision_mark
        recovery, extra = "rebuilt", {}
        try:
            metadata = read_index_metadata(self.index_path)
            index, saved_model = PrototypeIndex.load(self.index_path, use_gpu=self.config.use_gpu)
            if index.dim == self.dim and saved_model == self.model_version:
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
        self.thresholds = Thresholds(**saved) if recovery != "rebuilt" and saved else self.fit_thresholds()
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
            self._note_model(model)
            if self.thresholds.knn is None:
                self.thresholds = self.fit_thresholds()
            return len(region_ids)

    def _check_embeddings(self) -> None:
        ids = self.mirror.embedding_id[self.mirror.embedding_id >= 0]
        if ids.size and int(ids.max()) >= len(self.embeddings):
            raise ValueError(f"{self.embeddings.path} holds {len(self.embeddings)} embeddings but the store's regions "
                             f"name ids up to {int(ids.max())}: model {self.model_version!r} was made active without "
                             "re-embedding the regions (activate models with POST /v1/models or adisc retrain "
                             "--activate), or the work folder comes from an older version (publish it again)")

    def _note_model(self, active: str) -> None:
        """A loop whose model is no longer the store's active one is stale: it stops saving the index (the new
        model's loop owns the file now) and refuses arrivals; its owner opens a new loop."""
        if active != self.model_version and not self.pinned:
            if not self.stale:
                logger.info("the store now serves model %s (this loop: %s)", active, self.model_version)
            self.stale = True

    def use_model(self, model_version: str) -> None:
        """Work with ``model_version``'s embeddings from now on: how the first discovery run enters a store that
        serves no model yet (a store with regions already keeps its model; see ``ingest_discovery``)."""
        with self.lock:
            if model_version == self.model_version:
                return
            if self.model_version != NO_MODEL or self.mirror.count():
                raise ValueError(f"the store serves model {self.model_version!r} ({self.mirror.count()} regions): a "
                                 f"run of model {model_version!r} needs that model activated first, or a new work "
                                 "folder")
            self.model_version = model_version
            self.embeddings = EmbeddingFile(embeddings_path(self.index_path, model_version), self.dim)

    def fit_thresholds(self) -> Thresholds:
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
        """Write the index atomically, tagged with the loop's model version and the store watermark; a stale loop
        (its model no longer the store's active one) writes nothing."""
        with self.lock:
            if not self.pinned:
                self._note_model(self.store_model())
            if self.stale:
                return self.index_path
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

    def label_predictions(self, regions: Sequence[PredictedRegion]) -> list[RegionLabel]:
        """Labels of predicted regions: the discovery model's own class where it gives one, else the index's
        (``labelling``)."""
        if not regions:
            return []
        with self.lock:
            index_labels = self.label_embeddings(np.stack([r.embedding for r in regions]))
            return label_by_model(regions, index_labels, self.classes, self.model_classes, self.centroids)

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
        """Load a discovery run: images, regions (+ embeddings), and the model's first assignments (``ingest``).
        Returns the new region ids."""
        return ingest.ingest_discovery(self, images, regions, known_classes, model_version, artifact_path, metrics,
                                       product or self.config.product, dataset)

    def ingest_images(self, images: Sequence[ArrivedImage], predictor: RegionPredictor,
                      arrays: Sequence[np.ndarray]) -> list[IngestedImage]:
        """Predict ``arrays`` with ``predictor`` and ingest them (see ``ingest_predictions``)."""
        return self.ingest_predictions(images, predictor.predict(list(arrays)))

    def ingest_predictions(self, images: Sequence[ArrivedImage],
                           predictions: Sequence[PredictedImage]) -> list[IngestedImage]:
        """Store and label new arrivals (``ingest.ingest_predictions``)."""
        return ingest.ingest_predictions(self, images, predictions)

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

    def image_counts(self) -> dict[int, int]:
        """Images per live class by the discovery model's image class (followed through merges)."""
        with self.store.session() as session:
            rows = session.execute(select(Image.model_class_id, func.count()).where(Image.model_class_id.is_not(None))
                                   .group_by(Image.model_class_id)).all()
        counts: dict[int, int] = {}
        with self.lock:
            for class_id, n in rows:
                info = live_class(class_id, self.classes)
                if info is not None:
                    counts[info.id] = counts.get(info.id, 0) + int(n)
        return counts

    def list_proposals(self, statuses: Sequence[ProposalStatus] = (ProposalStatus.OPEN,)) -> list[Proposal]:
        with self.store.session() as session:
            return list(session.scalars(select(Proposal).where(Proposal.status.in_(list(statuses)))
                                        .order_by(Proposal.id)))
