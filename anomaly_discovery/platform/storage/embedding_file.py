"""Append-only store of region embeddings keyed by embedding id (the id a region's ``embedding_id`` names).

One raw file: a 16-byte header (magic ``ADEMB001`` + dimension + reserved) followed by float32 rows; an
embedding's id is its row number. Rows are never rewritten, so readers memory-map the file and only re-map when
asked for an id past the mapped length. ``append`` takes an exclusive ``flock`` (several Serve replicas may
append to one file), drops a torn tail row left by a crash, writes, and fsyncs before returning the ids, so a
store transaction that references them commits only after the vectors are durable. Rows written by a process
that then crashed before its store commit stay unreferenced (harmless).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path

import numpy as np

MAGIC = b"ADEMB001"
HEADER = struct.Struct("<8sII")


def stored_dim(path: str | Path) -> int | None:
    """The embedding dimension an existing file's header names; ``None`` when there is no such file or it is not
    an embedding file. Reads the header only (opening an ``EmbeddingFile`` would create a missing file)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        header = handle.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    magic, dim, _ = HEADER.unpack(header)
    return int(dim) if magic == MAGIC else None


class EmbeddingFile:
    """Float32 (N, dim) rows on disk; ``get(ids)`` gathers rows, ``append(vectors)`` returns their new ids."""

    def __init__(self, path: str | Path, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.path, self.dim = Path(path), int(dim)
        self.row_bytes = 4 * self.dim
        self._lock = threading.Lock()
        self._map: np.ndarray = np.zeros((0, self.dim), np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0, os.SEEK_END)
                if handle.tell() == 0:
                    handle.write(HEADER.pack(MAGIC, self.dim, 0))
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        with open(self.path, "rb") as handle:
            magic, stored_dim, _ = HEADER.unpack(handle.read(HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{self.path} is not an embedding file (bad magic {magic!r})")
        if stored_dim != self.dim:
            raise ValueError(f"{self.path} holds {stored_dim}-d embeddings, expected {self.dim}-d")
        self._remap()

    def _rows_on_disk(self) -> int:
        return max(0, (self.path.stat().st_size - HEADER.size) // self.row_bytes)

    def _remap(self) -> None:
        rows = self._rows_on_disk()
        self._map = (np.memmap(self.path, dtype=np.float32, mode="r", offset=HEADER.size, shape=(rows, self.dim))
                     if rows else np.zeros((0, self.dim), np.float32))

    def __len__(self) -> int:
        return len(self._map)

    def append(self, vectors: np.ndarray) -> np.ndarray:
        """Write (n, dim) float32 rows durably; returns their ids (int64)."""
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("embeddings must be finite")
        with self._lock, open(self.path, "r+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                start = self._rows_on_disk()
                end_of_whole_rows = HEADER.size + start * self.row_bytes
                handle.truncate(end_of_whole_rows)
                handle.seek(end_of_whole_rows)
                handle.write(array.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            self._remap()
        return np.arange(start, start + len(array), dtype=np.int64)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """(n, dim) copy of the rows ``ids``; an id never written is a ``KeyError``."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and ids.max() >= len(self._map):
            with self._lock:
                self._remap()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._map)):
            bad = ids[(ids < 0) | (ids >= len(self._map))][:10].tolist()
            raise KeyError(f"embedding ids {bad} are not in {self.path} ({len(self._map)} rows)")
        return np.array(self._map[ids], dtype=np.float32)


def write_embedding_file(path: str | Path, dim: int, ids: np.ndarray, vectors: np.ndarray) -> Path:
    """A whole embeddings file whose row ``ids[i]`` is ``vectors[i]`` (rows no id names are zeros: never
    referenced), written through a temporary file in the same folder and ``os.replace``d into ``path``."""
    path, ids = Path(path), np.asarray(ids, np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), dim)
    if not np.isfinite(vectors).all():
        raise ValueError("embeddings must be finite")
    rows = np.zeros((int(ids.max()) + 1 if ids.size else 0, dim), np.float32)
    rows[ids] = vectors
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(HEADER.pack(MAGIC, dim, 0))
            handle.write(rows.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
