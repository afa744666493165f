"""The prediction and review API (issue 6 items 4–5): a FastAPI app served by Ray Serve.

``create_app(core, predict)`` builds the FastAPI app around a :class:`ServiceCore` (store + review loop +
predictor); ``DiscoveryService`` is the Serve deployment (``@serve.ingress``) whose model call is batched with
``@serve.batch``; ``build_app(args)`` is the application builder named in ``deploy/serve_config.yaml``;
``run_serve(args)`` starts it locally (``adisc serve``).

Endpoints (OpenAPI at ``/docs``; every error is ``{"detail": "<message>"}`` with a 4xx status):

=================================  =====  ===============================================================
``GET  /healthz``                         liveness, model version, counts
``POST /v1/predict``                      multipart ``images`` (1..max_images files): score, mask, labelled regions
``GET  /v1/classes``                      live classes (``?all=true``: every class) with sizes and versions
``GET  /v1/proposals``                    proposals (``?status=open`` by default)
``POST /v1/proposals/{id}/decision``  W  confirm / reject / merge a proposal (``expected_version`` required)
``POST /v1/classes/{id}/decision``    W  rename / merge / split a class
``POST /v1/regions/move``             W  move single regions to a class (or unassigned)
``POST /v1/undo``                     W  undo the newest reviewer action
``POST /v1/images``                   W  ingest new arrivals (stored, labelled, proposals updated)
``POST /v1/models``                   W  activate a model folder (regions re-embedded, index swapped); replicas follow
``GET  /v1/models/active``                the model this replica serves
``GET  /v1/export``                       the reviewed state as CSV or COCO JSON (``?format=csv|coco``)
=================================  =====  ===============================================================

W = needs ``Authorization: Bearer <token>``; the token is read from the environment variable named by
``token_env`` (default ``ADISC_API_TOKEN``) when a replica starts; without it every write answers 503.

Bad input never reaches the store: the request body is capped (``max_body_mb``, 413), files are decoded
fully before anything is written (not an image → 415, truncated/corrupt → 400, over ``max_pixels`` → 413,
decompression bombs included since the size is read from the header first), a JSON body on a multipart route
→ 415, stale versions → 409, unknown ids → 404. Model swap without downtime: ``POST /v1/models`` re-embeds every
stored region with the new model into a new index built beside the served one and swaps it in, or answers 409 with
the reason (``platform/review/activation.py``); each replica polls the store's active model version every
``model_poll_s`` seconds, loads the new predictor and loop beside the old pair and swaps the references together;
requests in flight finish on the old pair. An arrival that raced a swap answers 503 (send it again).
Image decoding, mask encoding and the body limit live in ``io``; the review routes in ``routes``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from fastapi import Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
import ray
from ray import serve
from ray.serve import Application

from anomaly_discovery.platform.predictor import MANIFEST, PredictedImage
from anomaly_discovery.platform.review.actions import LIVE
from anomaly_discovery.platform.review.activation import ActivationRefused
from anomaly_discovery.platform.review.loop import DiscoveryLoop, InvalidActionError, ModelChangedError, NotFoundError
from anomaly_discovery.platform.review.types import ArrivedImage, RegionLabel
from anomaly_discovery.platform.service.core import ServeSettings, ServiceCore, Serving
from anomaly_discovery.platform.service.exports import export_router
from anomaly_discovery.platform.service.io import BodyLimitMiddleware, bad_request, decode_image, encode_mask
from anomaly_discovery.platform.service.routes import review_router
from anomaly_discovery.platform.service.shutdown import interrupt_on_terminate
from anomaly_discovery.platform.service.schemas import (ErrorOut, Health, ImagePredictionOut, IngestedImageOut,
                                                        IngestedRegionOut, IngestResponse, ModelOut, ModelRegistration,
                                                        PredictResponse, RegionOut)
from anomaly_discovery.platform.storage.store import ConflictError

logger = logging.getLogger(__name__)
MULTIPART_ROUTES = ("/v1/predict", "/v1/images")
ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 415, 422, 503)}


Answers = list[tuple[PredictedImage, Serving]]
PredictFn = Callable[[list[np.ndarray]], Awaitable[tuple[Answers, dict[str, float]]]]
STAGES = ("decode", "queue", "detector", "localisation", "discovery", "index")


def server_timing(seconds: Mapping[str, float]) -> str:
    """The ``Server-Timing`` header (W3C): each stage's milliseconds, in :data:`STAGES` order, then ``total``."""
    stages = [*[s for s in STAGES if s in seconds], *[s for s in seconds if s not in STAGES]]
    return ", ".join(f"{stage};dur={1000 * seconds[stage]:.1f}" for stage in stages)


def region_out(loop: DiscoveryLoop, region, label: RegionLabel) -> dict:
    proposal_id = loop.open_proposals.get(label.class_id) if label.kind == "new" else None
    return {"box": region.box, "anomaly_score": region.anomaly_score, "label": label.name, "kind": label.kind,
            "class_id": label.class_id, "proposal_id": proposal_id, "outlier_score": label.outlier_score,
            "similarity": label.similarity, "model_cluster": region.class_index,
            "model_outlier_score": region.outlier_score, "model_confidence": region.confidence}


async def read_images(files: list[UploadFile], settings: ServeSettings
                      ) -> list[tuple[str, bytes, np.ndarray, str]]:
    if not files:
        raise bad_request(422, "send at least one file in the multipart field 'images'")
    if len(files) > settings.max_images:
        raise bad_request(413, f"{len(files)} images in one request; the limit is {settings.max_images}")
    decoded = []
    for position, upload in enumerate(files):
        name = upload.filename or f"image {position}"
        data = await upload.read()
        array, extension = await run_in_threadpool(decode_image, data, name, settings.max_pixels)
        decoded.append((name, data, array, extension))
    return decoded


async def timed_predict(predict: PredictFn, arrays: list[np.ndarray]) -> tuple[Answers, dict[str, float]]:
    """``predict`` and its stages' seconds; ``queue`` is the wait before the model ran (batching, a busy replica)."""
    started = time.perf_counter()
    answers, stages = await predict(arrays)
    stages = dict(stages)
    stages["queue"] = max(0.0, time.perf_counter() - started - sum(stages.values()))
    return answers, stages


async def in_thread(core: ServiceCore, arrays: list[np.ndarray]) -> tuple[Answers, dict[str, float]]:
    """The model call without Serve's batching: the predictor in a worker thread."""
    predictions, stages, serving = await run_in_threadpool(core.predict, arrays)
    return [(prediction, serving) for prediction in predictions], stages


def create_app(core: ServiceCore, predict: PredictFn | None = None) -> FastAPI:
    """The FastAPI app of one replica; ``predict`` (default: the predictor in a worker thread) is how the
    model is called — the Serve deployment passes its ``@serve.batch`` method. ``POST /v1/predict`` answers with
    a ``Server-Timing`` header: milliseconds of decode, queue (batching), detector, localisation, discovery, index
    (labelling the regions against the classes and the index, and encoding the answer) and total."""
    settings = core.settings
    predict = predict or (lambda images: in_thread(core, images))
    app = FastAPI(title="anomaly-discovery", version="1", description=__doc__.split("\n\n")[0],
                  responses=ERRORS)
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_body_mb * 1024 * 1024))

    @app.exception_handler(ConflictError)
    async def conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0]) if exc.args else str(exc)}, status_code=404)

    @app.exception_handler(InvalidActionError)
    async def invalid(_: Request, exc: InvalidActionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(ActivationRefused)
    async def refused(_: Request, exc: ActivationRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(ModelChangedError)
    async def model_changed(_: Request, exc: ModelChangedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if request.url.path in MULTIPART_ROUTES and not content_type.startswith("multipart/form-data"):
            return JSONResponse({"detail": f"{request.url.path} takes multipart/form-data with one or more 'images' "
                                           f"file parts, got content type {content_type or 'none'!r}"},
                                status_code=415)
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    def require_token(authorization: Optional[str] = Header(None)) -> None:
        if core.token is None:
            raise bad_request(503, f"writes are disabled: the server's environment variable {settings.token_env} "
                                   "holds no token")
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(401, "this endpoint needs an 'Authorization: Bearer <token>' header",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(presented.strip().encode(), core.token.encode()):
            raise HTTPException(403, "the bearer token is not valid", headers={"WWW-Authenticate": "Bearer"})

    write = [Depends(require_token)]

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        serving = core.serving
        loop = serving.loop
        return Health(status="ok", model_version=serving.predictor.model_version, regions=loop.mirror.count(),
                      classes=sum(c.status in LIVE for c in loop.classes.values()),
                      open_proposals=len(loop.open_proposals), index=loop.recovery,
                      writes_enabled=core.token is not None)

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict_images(response: Response, images: list[UploadFile] = File(..., description="image files"),
                             mask_format: Literal["png", "rle"] = "png") -> PredictResponse:
        started = time.perf_counter()
        decoded = await read_images(images, settings)
        decode_s = time.perf_counter() - started
        answers, stages = await timed_predict(predict, [array for _, _, array, _ in decoded])
        labelling = time.perf_counter()
        await run_in_threadpool(core.maybe_sync)
        out = []
        for (name, _, array, _), (prediction, serving) in zip(decoded, answers):
            labels = await run_in_threadpool(serving.loop.label_predictions, prediction.regions)
            out.append(ImagePredictionOut(
                filename=name, width=array.shape[1], height=array.shape[0], anomaly_score=prediction.score,
                mask=encode_mask(prediction.mask, mask_format),
                regions=[RegionOut(**region_out(serving.loop, r, lab))
                         for r, lab in zip(prediction.regions, labels)]))
        stages |= {"decode": decode_s, "index": time.perf_counter() - labelling,
                   "total": time.perf_counter() - started}
        response.headers["Server-Timing"] = server_timing(stages)
        return PredictResponse(model_version=answers[0][1].predictor.model_version, images=out)

    @app.post("/v1/images", response_model=IngestResponse, dependencies=write)
    async def ingest(images: list[UploadFile] = File(..., description="image files")
                     ) -> IngestResponse:
        decoded = await read_images(images, settings)
        answers, _ = await predict([array for _, _, array, _ in decoded])
        predictions, servings = [a[0] for a in answers], {a[1] for a in answers}
        if len(servings) > 1:
            raise ModelChangedError("the served model changed while this request ran: nothing was stored, send the "
                                    "images again")
        serving = servings.pop()
        arrived = []
        for _, data, _, extension in decoded:
            path, digest = await run_in_threadpool(core.store_image, data, extension)
            arrived.append(ArrivedImage(path, digest))
        loop = serving.loop
        results = await run_in_threadpool(loop.ingest_predictions, arrived, predictions)
        out = []
        for (name, *_), prediction, result in zip(decoded, predictions, results):
            regions = [IngestedRegionOut(region_id=rid, **region_out(loop, r, lab))
                       for rid, r, lab in zip(result.region_ids, prediction.regions, result.labels)]
            out.append(IngestedImageOut(filename=name, image_id=result.image_id, duplicate=result.duplicate,
                                        anomaly_score=prediction.score, regions=regions))
        return IngestResponse(model_version=serving.predictor.model_version, images=out)

    app.include_router(review_router(core, write))
    app.include_router(export_router(core))

    @app.get("/v1/models/active", response_model=ModelOut)
    def active_model() -> ModelOut:
        name, _ = core.active_model_folder()
        predictor = core.predictor
        return ModelOut(model_version=predictor.model_version, embedding_dim=predictor.embedding_dim,
                        store_active_version=name)

    @app.post("/v1/models", response_model=ModelOut, dependencies=write)
    def register_model(body: ModelRegistration) -> ModelOut:
        """Activate a model folder: every stored region is re-embedded by it into a new index built beside the
        served one, then both swap (409 with the reason when it cannot be: a taken name, an unreadable image)."""
        if not (Path(body.artifact_path) / MANIFEST).is_file():
            raise bad_request(422, f"{body.artifact_path} holds no {MANIFEST}: not a predictor folder")
        try:
            predictor = core.register_model(body.name, body.artifact_path)
        except (OSError, ValueError) as exc:
            raise bad_request(422, f"model {body.artifact_path} cannot be loaded: {exc}") from exc
        return ModelOut(model_version=predictor.model_version, embedding_dim=predictor.embedding_dim,
                        store_active_version=body.name)

    return app



@serve.deployment(name="DiscoveryService", max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress()
class DiscoveryService:
    """One replica: a :class:`ServiceCore`, the FastAPI app around it, and the batched model call."""

    def __init__(self, args: dict):
        self.core = ServiceCore(ServeSettings.from_args(args))
        self.predict_batch.set_max_batch_size(self.core.settings.batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.core.settings.batch_wait_s)
        self.core.start_polling()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.core, self.predict_many)

    async def predict_many(self, images: list[np.ndarray]) -> tuple[Answers, dict[str, float]]:
        """Each image through the batched model call; a stage's seconds are the longest of its images' batches."""
        answers = await asyncio.gather(*(self.predict_batch(image) for image in images))
        stages: dict[str, float] = {}
        for _, seconds, _ in answers:
            for stage, value in seconds.items():
                stages[stage] = max(stages.get(stage, 0.0), value)
        return [(prediction, serving) for prediction, _, serving in answers], stages

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]
                            ) -> list[tuple[PredictedImage, dict[str, float], Serving]]:
        """The model call, batched across concurrent requests, off the replica's event loop; each answer carries
        its batch's stage seconds and the predictor / loop pair that made it."""
        predictions, stages, serving = await asyncio.to_thread(self.core.predict, images)
        return [(prediction, stages, serving) for prediction in predictions]

    def check_health(self) -> None:
        self.core.loop.sync()

    def __del__(self) -> None:
        self.core.close()


def bound_service(settings: ServeSettings, num_replicas: int | None = None) -> Application:
    """The deployment bound to its arguments: ``replica_cpus`` CPUs per replica and, when the cluster has GPUs,
    ``gpu_fraction`` of one; ``num_replicas`` fixed when given (else the config's replicas / autoscaling)."""
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    actor_options: dict[str, float] = {"num_cpus": settings.replica_cpus}
    if settings.gpu_fraction > 0 and gpus > 0:
        actor_options["num_gpus"] = settings.gpu_fraction
    options: dict[str, Any] = {"ray_actor_options": actor_options}
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    return DiscoveryService.options(**options).bind(asdict(settings))


def build_app(args: dict) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: anomaly_discovery.platform.service.app:
    build_app``): validates the arguments and binds the deployment (see ``bound_service``)."""
    return bound_service(ServeSettings.from_args(args))


def run_serve(args: Mapping[str, Any] | Any) -> int:
    """``adisc serve``: start Ray (if needed) and the application on ``host:port``, block until SIGINT (Ctrl-C)
    or SIGTERM, then shut Serve down and the Ray it started (raylet, workers, the proxy holding the port).

    Arguments (a mapping or an argparse namespace): ``store`` (--store URL), ``index`` (--index PATH),
    ``model`` (--model DIR), ``host`` (--host, default 127.0.0.1), ``port`` (--port, default 8000),
    ``token_env`` (--token-env, default ADISC_API_TOKEN), optionally ``replicas`` (--replicas, default 1) and
    any other :class:`ServeSettings` field."""
    values = dict(args if isinstance(args, Mapping) else vars(args))
    host, port = values.pop("host", None) or "127.0.0.1", int(values.pop("port", None) or 8000)
    replicas = int(values.pop("replicas", None) or 1)
    names = {f.name for f in fields(ServeSettings)}
    settings = ServeSettings.from_args({k: v for k, v in values.items() if k in names and v is not None})
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)
    try:
        with interrupt_on_terminate():  # after ray.init, which installs a SIGTERM handler of its own
            serve.start(http_options={"host": host, "port": port})
            serve.run(bound_service(settings, replicas), name="adisc", route_prefix="/", blocking=False)
            token_state = ("set" if os.environ.get(settings.token_env)
                           else f"NOT set: writes answer 503 until {settings.token_env} is")
            print(f"adisc serve: http://{host}:{port} (docs at /docs); token variable {settings.token_env} "
                  f"{token_state}; Ctrl-C or SIGTERM stops", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("adisc serve: stopping", flush=True)
    finally:
        if ray.is_initialized():
            serve.shutdown()
        if started_ray:
            ray.shutdown()
    return 0
