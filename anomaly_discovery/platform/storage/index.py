"""FAISS prototype index (issue 6 item 2): cosine k-NN over region embeddings and class prototypes.

Design:

* Two id spaces ("kinds") in one object, each its own FAISS index: ``"region"`` holds the embeddings of
  known-class member regions (id = the region's ``embedding_id``) and is the reference set of the k-NN
  outlier score; ``"prototype"`` holds one vector per class (id = the class id) for nearest-class look-ups.
  Separate indexes keep each search exact to its set (no id filtering inside HNSW/IVF graphs).
* Vectors are L2-normalised on the way in, so inner product = cosine similarity.
* Up to ``approximate_above`` vectors a kind is an ``IndexIDMap2(IndexFlatIP)``: exact, add and remove by
  id in place (removal compacts the flat array; nothing is rebuilt). Above it the kind becomes an
  ``IndexIVFFlat`` (inner product, √n lists, ``nprobe`` probed, hashtable direct map): IVF keeps ids
  natively, supports ``remove_ids`` and ``reconstruct`` incrementally, whereas HNSW cannot remove ids at all
  (it would need tombstones and periodic rebuilds). The IVF lists are retrained once the kind has grown
  ``retrain_growth``× past the size it was trained at; it never switches back to flat.
* ``use_gpu=True`` with ``faiss.get_num_gpus() > 0`` searches a GPU copy of each kind; the CPU index stays
  the master for adds, removals and saves, and the GPU copy is refreshed on the next search after a change.
  Without GPUs (faiss-cpu) it searches on the CPU.
* ``save`` writes one file (both serialised indexes, their ids and the metadata: model version, counts)
  through a temp file in the same folder + ``os.replace``, then an informational JSON sidecar
  ``<path>.json`` the same way. ``load`` and ``read_index_metadata`` trust only the metadata inside the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from anomaly_discovery.models.discovery.outliers import OutlierThreshold

KINDS = ("region", "prototype")
METRICS = ("cosine",)
FORMAT_VERSION = 1
TRAINING_POINTS_PER_LIST = 64
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    approximate_above: int = 50_000
    nprobe: int = 32
    retrain_growth: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.approximate_above < 1 or self.nprobe < 1 or self.retrain_growth <= 1.0:
            raise ValueError(f"IndexConfig needs approximate_above >= 1, nprobe >= 1 and retrain_growth > 1, "
                             f"got {self}")


def _as_ids(ids: Any) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D array of integers, got shape {array.shape} dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"ids must be >= 0 (FAISS uses -1 for 'no neighbour'), got {int(array.min())}")
    return np.ascontiguousarray(array)


def _normalised(vectors: Any, dim: int) -> np.ndarray:
    array = np.array(vectors, dtype=np.float32, order="C", ndmin=2, copy=True)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"vectors must have shape (N, {dim}), got {np.shape(vectors)}")
    norms = np.linalg.norm(array, axis=1)
    if not np.isfinite(array).all() or (norms == 0).any():
        raise ValueError("vectors must be finite and non-zero (a zero vector has no direction)")
    faiss.normalize_L2(array)
    return array


def _flat_index(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _ivf_index(ids: np.ndarray, vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
    """IVF-Flat on inner product with √n lists, trained on a sample, ids kept in a hashtable direct map."""
    n_lists = max(1, int(round(math.sqrt(len(ids)))))
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], n_lists, faiss.METRIC_INNER_PRODUCT)
    n_train = min(len(ids), TRAINING_POINTS_PER_LIST * n_lists)
    sample = np.random.default_rng(config.seed).choice(len(ids), n_train, replace=False)
    index.train(vectors[np.sort(sample)])
    index.nprobe = min(config.nprobe, n_lists)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add_with_ids(vectors, ids)
    return index


class _KindIndex:
    """One id space: a flat IDMap2 index that turns into IVF above the size threshold."""

    def __init__(self, dim: int, config: IndexConfig, index: faiss.Index | None = None,
                 ids: np.ndarray | None = None, trained_size: int = 0):
        self.dim, self.config = dim, config
        self.index = index if index is not None else _flat_index(dim)
        self.ids = set(ids.tolist()) if ids is not None else set()
        self.trained_size = trained_size
        self.gpu_copy: faiss.Index | None = None

    @property
    def index_type(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    def describe(self) -> dict[str, Any]:
        ivf = self.index_type == "ivf"
        return {"index_type": self.index_type, "count": len(self.ids), "trained_size": self.trained_size,
                "n_lists": self.index.nlist if ivf else None, "nprobe": self.index.nprobe if ivf else None}

    def all_ids(self) -> np.ndarray:
        return np.fromiter(sorted(self.ids), dtype=np.int64, count=len(self.ids))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        total = len(self.ids) + len(ids)
        grow_to_ivf = self.index_type == "flat" and total > self.config.approximate_above
        retrain = self.index_type == "ivf" and total > self.config.retrain_growth * self.trained_size
        if grow_to_ivf or retrain:
            old_ids = self.all_ids()
            all_ids = np.concatenate([old_ids, ids])
            all_vectors = np.concatenate([self.reconstruct(old_ids), vectors])
            logger.info("building an IVF index over %d vectors", total)
            self.index = _ivf_index(all_ids, all_vectors, self.config)
            self.trained_size = total
        else:
            self.index.add_with_ids(vectors, ids)
        self.ids.update(ids.tolist())
        self.gpu_copy = None

    def remove(self, ids: np.ndarray) -> int:
        present = np.array([i for i in ids.tolist() if i in self.ids], dtype=np.int64)
        if present.size:
            self.index.remove_ids(present)
            self.ids.difference_update(present.tolist())
            self.gpu_copy = None
        return int(present.size)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(ids)

    def search(self, vectors: np.ndarray, k: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
        searcher = self.index
        if use_gpu:
            if self.gpu_copy is None:
                self.gpu_copy = faiss.index_cpu_to_all_gpus(self.index)
            searcher = self.gpu_copy
        return searcher.search(vectors, k)


class PrototypeIndex:
    """Cosine k-NN over region embeddings and class prototypes, add/remove by int64 id (see module doc)."""

    def __init__(self, dim: int, metric: str = "cosine", config: IndexConfig | None = None, use_gpu: bool = False):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim, self.metric = dim, metric
        self.config = config or IndexConfig()
        self.on_gpu = bool(use_gpu and faiss.get_num_gpus() > 0)
        if use_gpu and not self.on_gpu:
            logger.info("use_gpu requested but faiss sees no GPU: searching on the CPU")
        self._kinds = {kind: _KindIndex(dim, self.config) for kind in KINDS}
        self._lock = threading.RLock()

    def _kind(self, kind: str) -> _KindIndex:
        if kind not in self._kinds:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self._kinds[kind]

    def count(self, kind: str = "region") -> int:
        return len(self._kind(kind).ids)

    def ids(self, kind: str = "region") -> np.ndarray:
        """Sorted int64 ids held for ``kind``."""
        with self._lock:
            return self._kind(kind).all_ids()

    def index_type(self, kind: str = "region") -> str:
        """``"flat"`` (exact) or ``"ivf"`` (approximate)."""
        return self._kind(kind).index_type

    def describe(self, kind: str = "region") -> dict[str, Any]:
        """Index type, count, and for IVF the number of lists, ``nprobe`` and the size it was trained at."""
        with self._lock:
            return self._kind(kind).describe()

    def add(self, ids: Any, vectors: Any, kind: str = "region", replace: bool = False) -> None:
        """Add (N, dim) vectors under int64 ``ids``; ``replace=True`` first removes ids already present
        (how a prototype is updated), otherwise a present id is an error."""
        target = self._kind(kind)
        ids, vectors = _as_ids(ids), _normalised(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"ids repeat within one add: {values[counts > 1][:10].tolist()}")
        with self._lock:
            if replace:
                target.remove(ids)
            present = [i for i in ids.tolist() if i in target.ids]
            if present:
                raise ValueError(f"{kind} ids already in the index: {present[:10]} (pass replace=True to update)")
            target.add(ids, vectors)

    def remove(self, ids: Any, kind: str = "region") -> int:
        """Remove ids (absent ones are ignored); returns how many were removed."""
        with self._lock:
            return self._kind(kind).remove(_as_ids(ids))

    def vectors(self, ids: Any, kind: str = "region") -> np.ndarray:
        """The stored (normalised) vectors of ``ids``."""
        target, ids = self._kind(kind), _as_ids(ids)
        with self._lock:
            missing = [i for i in ids.tolist() if i not in target.ids]
            if missing:
                raise KeyError(f"{kind} ids not in the index: {missing[:10]}")
            return target.reconstruct(ids)

    def search(self, vectors: Any, k: int, kind: str = "region") -> tuple[np.ndarray, np.ndarray]:
        """(N, k) cosine similarities (descending) and ids of the k nearest stored vectors; id -1 and
        similarity -inf where fewer than k were found."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = _normalised(vectors, self.dim)
        with self._lock:
            similarities, ids = self._kind(kind).search(queries, k, self.on_gpu)
        similarities = np.where(ids < 0, -np.inf, similarities).astype(np.float32)
        return similarities, ids

    def knn_outlier_scores(self, vectors: Any, k: int = 1, kind: str = "region",
                           exclude_ids: Any = None) -> np.ndarray:
        """(N,) cosine distance 1 − cos to the k-th nearest stored vector (methods §2 k-NN OOD score; higher =
        more unseen). ``exclude_ids`` (one per query) skips the query's own id, for leave-one-out scores of
        vectors already in the index. A missing neighbour counts as distance 2."""
        extra = 0 if exclude_ids is None else 1
        n_stored = self.count(kind)
        if not 1 <= k <= n_stored - extra:
            raise ValueError(f"k must be in [1, {n_stored - extra}] for {n_stored} stored {kind} vectors"
                             f"{' less the query itself' if extra else ''}, got {k}")
        similarities, ids = self.search(vectors, k + extra, kind)
        if exclude_ids is not None:
            own = _as_ids(exclude_ids)
            if len(own) != len(ids):
                raise ValueError(f"exclude_ids needs one id per query: {len(own)} ids for {len(ids)} queries")
            similarities = np.where(ids == own[:, None], -np.inf, similarities)
            similarities = -np.sort(-similarities, axis=1)
        kth = similarities[:, k - 1]
        return np.clip(1.0 - np.where(np.isfinite(kth), kth, -1.0), 0.0, 2.0).astype(np.float32)

    def _metadata(self, model_version: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "model_version": model_version, "dim": self.dim, "metric": self.metric,
            "counts": {kind: len(k.ids) for kind, k in self._kinds.items()},
            "kinds": {kind: k.describe() for kind, k in self._kinds.items()},
            "config": asdict(self.config), "saved_at": datetime.now(timezone.utc).isoformat(),
            "extra": dict(extra or {}),
        }

    def save(self, path: str | Path, model_version: str, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the index atomically to ``path`` tagged with ``model_version`` (plus JSON-able ``extra``),
        then the sidecar ``<path>.json``. A crash at any point leaves the previous file whole."""
        path = Path(path)
        with self._lock:
            metadata = self._metadata(str(model_version), extra)
            arrays = {"metadata": np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)}
            for kind, target in self._kinds.items():
                arrays[f"{kind}_index"] = faiss.serialize_index(target.index)
                arrays[f"{kind}_ids"] = target.all_ids()
        _atomic_write(path, lambda handle: np.savez(handle, **arrays))
        _atomic_write(sidecar_path(path), lambda handle: handle.write(json.dumps(metadata, indent=2).encode()))
        return path

    @classmethod
    def load(cls, path: str | Path, use_gpu: bool = False) -> tuple[PrototypeIndex, str]:
        """Read a saved index; returns it and the model version it was saved with."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as archive:
            metadata = _parse_metadata(archive, path)
            index = cls(metadata["dim"], metadata["metric"], IndexConfig(**metadata["config"]), use_gpu=use_gpu)
            for kind in KINDS:
                stored = faiss.deserialize_index(archive[f"{kind}_index"])
                index._kinds[kind] = _KindIndex(index.dim, index.config, stored, archive[f"{kind}_ids"],
                                                metadata["kinds"][kind]["trained_size"])
        for kind in KINDS:
            if index.count(kind) != index._kinds[kind].index.ntotal:
                raise ValueError(f"index file {path} is inconsistent: {index.count(kind)} {kind} ids for "
                                 f"{index._kinds[kind].index.ntotal} vectors")
        return index, metadata["model_version"]


def _parse_metadata(archive: Any, path: Path) -> dict[str, Any]:
    if "metadata" not in archive:
        raise ValueError(f"{path} is not a PrototypeIndex file (no metadata entry)")
    metadata = json.loads(archive["metadata"].tobytes().decode())
    if metadata.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has index format {metadata.get('format')}, this code reads {FORMAT_VERSION}")
    return metadata


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata saved inside an index file (model version, counts, ...) without loading the vectors."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as archive:
        return _parse_metadata(archive, path)


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a temp file in ``path``'s folder, fsync, then ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def fit_outlier_threshold(known_scores: Any, accept_rate: float = 0.95) -> float:
    """Outlier-score threshold that accepts ``accept_rate`` of known-class scores (score ≤ threshold = known)."""
    return OutlierThreshold(accept_rate).fit(known_scores).threshold_
