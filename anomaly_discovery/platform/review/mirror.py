"""The review loop's per-process mirror of the store's current assignments (numpy arrays indexed by region id),
and where the loop keeps the embeddings beside its index file."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from anomaly_discovery.platform.storage.models import AssignmentSource
from anomaly_discovery.platform.storage.store import Store, active_model_version

SOURCE_CODE = {AssignmentSource.MODEL: 0, AssignmentSource.REVIEWER: 1}
NO_ID = -1
NO_MODEL = "none"


def embeddings_path(index_path: str | Path, model_version: str = NO_MODEL) -> Path:
    """The embeddings of the regions as ``model_version`` embeds them, beside the index: one file per model
    version (its name in the file name, plus a hash that keeps names apart), ``<index>.embeddings.f32`` while
    the store has no model version."""
    index_path = Path(index_path)
    if model_version == NO_MODEL:
        return index_path.with_name(index_path.name + ".embeddings.f32")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_version)[:40]
    digest = hashlib.sha1(model_version.encode()).hexdigest()[:8]
    return index_path.with_name(f"{index_path.name}.{slug}-{digest}.embeddings.f32")


def active_embeddings_path(store: Store, index_path: str | Path) -> Path:
    """The embeddings file of the store's active model version (``embeddings_path`` of no model without one)."""
    with store.session() as session:
        active = active_model_version(session)
    return embeddings_path(index_path, active.name) if active is not None else embeddings_path(index_path)


class AssignmentMirror:
    """Current assignment of every region, as arrays indexed by region id (``NO_ID`` = none / no region)."""

    def __init__(self) -> None:
        self.class_id = np.zeros(0, np.int64)
        self.source = np.zeros(0, np.int8)
        self.embedding_id = np.zeros(0, np.int64)

    def _grow(self, size: int) -> None:
        if size > len(self.class_id):
            extra = max(size, 2 * len(self.class_id)) - len(self.class_id)
            self.class_id = np.concatenate([self.class_id, np.full(extra, NO_ID, np.int64)])
            self.source = np.concatenate([self.source, np.full(extra, NO_ID, np.int8)])
            self.embedding_id = np.concatenate([self.embedding_id, np.full(extra, NO_ID, np.int64)])

    def set(self, region_ids: np.ndarray, class_ids: np.ndarray, sources: np.ndarray,
            embedding_ids: np.ndarray) -> None:
        if len(region_ids):
            self._grow(int(region_ids.max()) + 1)
            self.class_id[region_ids], self.source[region_ids] = class_ids, sources
            self.embedding_id[region_ids] = embedding_ids

    def exists(self, region_ids: np.ndarray) -> np.ndarray:
        inside = (region_ids >= 0) & (region_ids < len(self.source))
        result = np.zeros(len(region_ids), bool)
        result[inside] = self.source[region_ids[inside]] != NO_ID
        return result

    def members(self, class_id: int) -> np.ndarray:
        return np.flatnonzero(self.class_id == class_id)

    def unknown(self) -> np.ndarray:
        """Regions without a class whose current assignment came from the model (a reviewer's "unassigned",
        e.g. after a rejection, is left alone)."""
        return np.flatnonzero((self.class_id == NO_ID) & (self.source == SOURCE_CODE[AssignmentSource.MODEL]))

    def count(self) -> int:
        return int((self.source != NO_ID).sum())
