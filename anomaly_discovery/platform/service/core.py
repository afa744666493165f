"""One replica's state without HTTP: :class:`ServeSettings` (the application arguments) and :class:`ServiceCore`
(store, review loop and the current predictor, with the model swap)."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from anomaly_discovery.platform.predictor import MANIFEST, PredictedImage, RegionPredictor, build_predictor
from anomaly_discovery.platform.review.loop import DiscoveryLoop, InvalidActionError
from anomaly_discovery.platform.review.types import LoopConfig
from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.platform.storage.store import Store, active_model_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Application arguments (``args`` in deploy/serve_config.yaml). ``workdir``: a work folder whose service
    state (:class:`ServicePaths`: what ``adisc demo`` publishes and ``adisc serve --workdir`` reads) gives the
    defaults of ``store`` (SQLAlchemy URL), ``index`` (the index file, embeddings beside it) and ``model``
    (predictor folder used until the store names an active model folder); ``image_dir``: where ingested images
    are kept (default ``<index folder>/images``)."""

    store: str
    index: str
    model: str
    workdir: Optional[str] = None
    token_env: str = "ADISC_API_TOKEN"
    image_dir: Optional[str] = None
    product: str = "default"
    max_body_mb: float = 32.0
    max_pixels: int = 40_000_000
    max_images: int = 16
    batch_size: int = 8
    batch_wait_s: float = 0.01
    model_poll_s: float = 10.0
    sync_interval_s: float = 1.0
    gpu_fraction: float = 0.0
    replica_cpus: float = 1.0

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ServeSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve argument(s) {unknown}; known: {sorted(known)}")
        if args.get("workdir"):
            paths = ServicePaths(Path(args["workdir"]))
            args = {"store": paths.store_url, "index": str(paths.index), "model": str(paths.model),
                    **{k: v for k, v in args.items() if v is not None}}
        missing = [name for name in ("store", "index", "model") if not args.get(name)]
        if missing:
            raise ValueError(f"serve needs the argument(s) {missing} (store URL, index file, model folder) or a "
                             "workdir holding them")
        settings = cls(**{k: v for k, v in args.items() if v is not None})
        if settings.max_body_mb <= 0 or settings.max_pixels < 1 or settings.max_images < 1 or settings.batch_size < 1:
            raise ValueError(f"max_body_mb, max_pixels, max_images and batch_size must be positive, got {settings}")
        if not 0 <= settings.gpu_fraction <= 1:
            raise ValueError(f"gpu_fraction must lie in [0, 1], got {settings.gpu_fraction}")
        return settings



class ServiceCore:
    """Store, review loop and the current predictor of one replica; no HTTP here. After start-up every object is
    moved out of the garbage collector's reach (``gc.freeze``): a full collection over the ~10⁵ objects of
    torch, sklearn and SQLAlchemy would otherwise stall a request for about half a second now and then."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.store = Store(settings.store)
        self.model_lock = threading.Lock()
        self.loaded_path: str | None = None
        self.predictor = self._initial_predictor()
        self.loop = DiscoveryLoop(self.store, settings.index, self.predictor.embedding_dim,
                                  LoopConfig(product=settings.product))
        self.token = os.environ.get(settings.token_env) or None
        self.image_dir = Path(settings.image_dir) if settings.image_dir else Path(settings.index).parent / "images"
        self._last_sync = time.monotonic()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        gc.freeze()

    def active_model_folder(self) -> tuple[str | None, str | None]:
        with self.store.session() as session:
            active = active_model_version(session)
            if active is None:
                return None, None
            return active.name, active.artifact_path

    def _initial_predictor(self) -> RegionPredictor:
        _, path = self.active_model_folder()
        chosen = path if path and (Path(path) / MANIFEST).is_file() else self.settings.model
        predictor = build_predictor(chosen)
        self.loaded_path = chosen
        return predictor

    def predict(self, images: list[np.ndarray]) -> list[PredictedImage]:
        predictor = self.predictor
        return predictor.predict(images)

    def load_model(self, path: str) -> RegionPredictor:
        """Load the predictor in ``path`` beside the serving one and swap them; refuses another dimension."""
        predictor = build_predictor(path)
        if predictor.embedding_dim != self.loop.dim:
            raise InvalidActionError(f"model {path} gives {predictor.embedding_dim}-d embeddings but the index holds "
                                     f"{self.loop.dim}-d ones: re-ingest the discovery run for a new embedding space")
        with self.model_lock:
            self.predictor, self.loaded_path = predictor, path
        logger.info("now serving model %s from %s", predictor.model_version, path)
        return predictor

    def check_model(self) -> None:
        """Swap to the store's active model folder when it changed (and holds a predictor)."""
        _, path = self.active_model_folder()
        if path and path != self.loaded_path and (Path(path) / MANIFEST).is_file():
            try:
                self.load_model(path)
            except (OSError, ValueError) as exc:
                logger.error("active model %s cannot be served: %s", path, exc)
                self.loaded_path = path

    def maybe_sync(self) -> None:
        if time.monotonic() - self._last_sync >= self.settings.sync_interval_s:
            self.loop.sync()
            self._last_sync = time.monotonic()

    def start_polling(self) -> None:
        if self.settings.model_poll_s > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="adisc-model-poll", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.model_poll_s):
            try:
                self.check_model()
            except Exception:
                logger.exception("model poll failed")

    def close(self) -> None:
        self._stop.set()
        self.loop.close()
        self.store.dispose()

    def store_image(self, data: bytes, extension: str) -> tuple[str, str]:
        """Keep the uploaded bytes content-addressed under ``image_dir``; returns (path, sha256)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.image_dir / f"{digest}.{extension}"
        if not path.exists():
            self.image_dir.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        return str(path), digest
