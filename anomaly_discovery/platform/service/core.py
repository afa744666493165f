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
from anomaly_discovery.platform.review.activation import ActivationRefused, activate_model, check_embeddings
from anomaly_discovery.platform.review.loop import DiscoveryLoop
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



@dataclass(frozen=True)
class Serving:
    """The predictor and the review loop on its embeddings: swapped together, used together by a request."""

    predictor: RegionPredictor
    loop: DiscoveryLoop


class ServiceCore:
    """Store, review loop and the current predictor of one replica; no HTTP here. After start-up every object is
    moved out of the garbage collector's reach (``gc.freeze``): a full collection over the ~10⁵ objects of
    torch, sklearn and SQLAlchemy would otherwise stall a request for about half a second now and then.

    Model swaps: ``register_model`` activates a model folder (``platform/review/activation.py``: every region
    re-embedded into a new index beside, then swapped; or refused with the reason) and serves it at once;
    ``check_model`` (polled every ``model_poll_s``) follows the store's active model version that another
    replica or ``adisc retrain --activate`` activated. A swap loads the predictor and opens a loop on the new
    embeddings beside the serving pair (:class:`Serving`), then replaces the pair; a request labels its regions
    with the loop of the pair that predicted them, so requests in flight finish on the old pair."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.store = Store(settings.store)
        self.model_lock = threading.Lock()
        predictor = self._initial_predictor()
        self.serving = Serving(predictor, self._open_loop(predictor))
        self.token = os.environ.get(settings.token_env) or None
        self.image_dir = Path(settings.image_dir) if settings.image_dir else Path(settings.index).parent / "images"
        self._last_sync = time.monotonic()
        self._refused_model: str | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        gc.freeze()

    @property
    def predictor(self) -> RegionPredictor:
        return self.serving.predictor

    @property
    def loop(self) -> DiscoveryLoop:
        return self.serving.loop

    def active_model_folder(self) -> tuple[str | None, str | None]:
        with self.store.session() as session:
            active = active_model_version(session)
            if active is None:
                return None, None
            return active.name, active.artifact_path

    def _initial_predictor(self) -> RegionPredictor:
        _, path = self.active_model_folder()
        return build_predictor(path if path and (Path(path) / MANIFEST).is_file() else self.settings.model)

    def _open_loop(self, predictor: RegionPredictor) -> DiscoveryLoop:
        return DiscoveryLoop(self.store, self.settings.index, predictor.embedding_dim,
                             LoopConfig(product=self.settings.product))

    def predict(self, images: list[np.ndarray]) -> tuple[list[PredictedImage], dict[str, float], Serving]:
        """The serving predictor's answer, the seconds of each of its stages, and the pair that answered."""
        serving, timings = self.serving, {}
        return serving.predictor.predict(images, timings), timings, serving

    def _serve(self, predictor: RegionPredictor) -> None:
        loop = self._open_loop(predictor)
        with self.model_lock:
            old, self.serving = self.serving, Serving(predictor, loop)
        old.loop.close()
        logger.info("now serving model version %s (%s)", loop.model_version, predictor.model_version)

    def register_model(self, name: str, artifact_path: str) -> RegionPredictor:
        """Activate the model folder ``artifact_path`` as version ``name`` and serve it (``ActivationRefused``
        when it cannot be; OSError / ValueError when the folder holds no loadable predictor)."""
        predictor = build_predictor(artifact_path)
        activate_model(self.store, self.settings.index, name, artifact_path, predictor, config=self.loop.config)
        self._serve(predictor)
        return predictor

    def check_model(self) -> None:
        """Serve the store's active model version when it is not the one served (and can be served)."""
        name, path = self.active_model_folder()
        if name is None or name == self.loop.model_version or name == self._refused_model:
            return
        try:
            if not path or not (Path(path) / MANIFEST).is_file():
                raise FileNotFoundError(f"{path} holds no {MANIFEST}")
            predictor = build_predictor(path)
            check_embeddings(self.settings.index, name, predictor.embedding_dim)
        except (OSError, ValueError, ActivationRefused) as exc:
            logger.error("the store's active model %s cannot be served (%s): still serving %s", name, exc,
                         self.loop.model_version)
            self._refused_model = name
            return
        self._serve(predictor)

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
