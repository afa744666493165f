"""Request-independent input / output of the API (``platform/service/app.py``): uploaded images decoded with their size
checked from the header first, masks encoded as PNG or run lengths, and the ASGI middleware that caps the request
body (413)."""

from __future__ import annotations

import base64

import cv2
import numpy as np
from fastapi import HTTPException

from anomaly_discovery.data.images import UploadRejected, decode_upload
from anomaly_discovery.platform.service.schemas import Mask

UPLOAD_STATUS = {"empty": 400, "corrupt": 400, "too_large": 413, "format": 415, "not_image": 415}


def bad_request(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def decode_image(data: bytes, filename: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """:func:`~anomaly_discovery.data.images.decode_upload`, its refusals as ``HTTPException`` 400 / 413 / 415."""
    try:
        return decode_upload(data, filename, max_pixels)
    except UploadRejected as exc:
        raise bad_request(UPLOAD_STATUS[exc.reason], str(exc)) from None


def encode_mask(mask: np.ndarray, mask_format: str) -> Mask:
    """The mask as PNG base64 or row-major run lengths (see ``serve_schemas``)."""
    mask = np.asarray(mask, bool)
    size = (int(mask.shape[0]), int(mask.shape[1]))
    if mask_format == "png":
        ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
        return Mask(format="png", size=size, png_base64=base64.b64encode(png.tobytes()).decode())
    flat = mask.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return Mask(format="rle", size=size, counts=([0] + counts) if flat.size and flat[0] else counts)


def decode_rle(counts: list[int], size: tuple[int, int]) -> np.ndarray:
    """Inverse of the ``rle`` encoding (for clients and tests)."""
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(size)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: at once from ``Content-Length``, otherwise while
    streaming (chunked uploads), before the endpoint sees a byte too many."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send) -> None:
        body = f'{{"detail": "request body over the limit of {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        received, exceeded, answered = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            """Once the limit is hit, whatever the app answers (its body parser turns our exception into a
            400) is replaced by the 413."""
            nonlocal answered
            if exceeded:
                if not answered:
                    answered = True
                    await self._refuse(send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if exceeded and not answered:
            await self._refuse(send)
