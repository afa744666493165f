"""Bad input against the API: more than twenty malformed, oversized, unauthorised or stale requests built from
real bad files, each answered with a 4xx JSON message; afterwards good requests still work and the store,
the index file and the image folder are exactly as before."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from anomaly_discovery.platform.service.app import ServeSettings, ServiceCore, create_app
from anomaly_discovery.platform.storage.models import (Assignment, Decision, DefectClass, Image as ImageRow,
                                                       ModelVersion, Proposal, Region)
from tests.platform.ray_fixtures import TOKEN, TOKEN_VARIABLE
from tests.platform.serve_world import build_world, defect_image, png_bytes

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_PIXELS = 1_000_000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` pixels (a decompression bomb's calling card)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def client(tmp_path, monkeypatch) -> TestClient:
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    world = build_world(tmp_path / "world")
    settings = ServeSettings.from_args(world.args(max_body_mb=1, max_pixels=MAX_PIXELS, max_images=3,
                                                  model_poll_s=0, sync_interval_s=0))
    core = ServiceCore(settings)
    with TestClient(create_app(core), raise_server_exceptions=False) as test_client:
        test_client.core, test_client.world = core, world
        yield test_client
    core.close()


def store_fingerprint(client: TestClient) -> dict:
    """Row counts, versions and decisions of the store; bytes of the index file; files of the image folder."""
    with client.core.store.session() as session:
        counts = {model.__name__: session.scalar(select(func.count()).select_from(model))
                  for model in (ImageRow, Region, Assignment, Decision, DefectClass, Proposal, ModelVersion)}
        versions = (session.execute(select(DefectClass.id, DefectClass.version)).all(),
                    session.execute(select(Proposal.id, Proposal.version, Proposal.status)).all())
    index = hashlib.sha256(client.world.index_path.read_bytes()).hexdigest()
    images = sorted(p.name for p in (client.world.index_path.parent / "images").glob("*"))
    return {"counts": counts, "versions": versions, "index": index, "images": images}


def upload(*parts: tuple[str, bytes, str]) -> list:
    return [("images", part) for part in parts]


def test_bad_requests_get_4xx_messages_and_change_nothing(client):
    good_png = png_bytes(defect_image("rust", 1))
    proposal = client.get("/v1/proposals").json()[0]
    rust = next(c for c in client.get("/v1/classes").json() if c["name"] == "rust")
    decision = f"/v1/proposals/{proposal['id']}/decision"
    confirm = {"action": "confirm", "name": "crack", "expected_version": proposal["version"]}

    def chunked_body():
        for _ in range(40):
            yield b"z" * 65536

    bad = [
        ("not an image", lambda: client.post("/v1/predict", files=upload(("a.png", b"plain text, no pixels", "image/png"))), 415),
        ("truncated png", lambda: client.post("/v1/predict", files=upload(("t.png", good_png[:len(good_png) // 2], "image/png"))), 400),
        ("truncated jpeg", lambda: client.post("/v1/predict", files=upload(
            ("t.jpg", encoded(defect_image("hole", 2), "JPEG")[:300], "image/jpeg"))), 400),
        ("bomb header", lambda: client.post("/v1/predict", files=upload(("bomb.png", png_claiming(100_000, 100_000), "image/png"))), 413),
        ("over pixel limit", lambda: client.post("/v1/predict", files=upload(
            ("big.png", cv2.imencode(".png", np.zeros((1500, 1500), np.uint8))[1].tobytes(), "image/png"))), 413),
        ("gif", lambda: client.post("/v1/predict", files=upload(("a.gif", encoded(defect_image("rust", 3), "GIF"), "image/gif"))), 415),
        ("empty file", lambda: client.post("/v1/predict", files=upload(("e.png", b"", "image/png"))), 400),
        ("json to multipart route", lambda: client.post("/v1/predict", json={"image": "aGk="}), 415),
        ("missing images field", lambda: client.post("/v1/predict", files=[("picture", ("a.png", good_png, "image/png"))]), 422),
        ("too many images", lambda: client.post("/v1/predict", files=upload(*[(f"{i}.png", good_png, "image/png") for i in range(4)])), 413),
        ("oversize body", lambda: client.post("/v1/predict", files=upload(("huge.png", b"\0" * (2 * 1024 * 1024), "image/png"))), 413),
        ("oversize chunked body", lambda: client.post("/v1/predict", content=chunked_body(),
                                                      headers={"Content-Type": "multipart/form-data; boundary=x"}), 413),
        ("bad mask format", lambda: client.post("/v1/predict?mask_format=jpeg", files=upload(("a.png", good_png, "image/png"))), 422),
        ("ingest without token", lambda: client.post("/v1/images", files=upload(("a.png", good_png, "image/png"))), 401),
        ("ingest wrong token", lambda: client.post("/v1/images", headers={"Authorization": "Bearer nope"},
                                                   files=upload(("a.png", good_png, "image/png"))), 403),
        ("ingest non-image", lambda: client.post("/v1/images", headers=AUTH, files=upload(("a.png", b"%PDF-1.4", "image/png"))), 415),
        ("ingest good + truncated", lambda: client.post("/v1/images", headers=AUTH, files=upload(
            ("good.png", good_png, "image/png"), ("bad.png", good_png[:100], "image/png"))), 400),
        ("decision without token", lambda: client.post(decision, json=confirm), 401),
        ("decision basic auth", lambda: client.post(decision, json=confirm, headers={"Authorization": "Basic YTpi"}), 401),
        ("unknown proposal", lambda: client.post("/v1/proposals/99999/decision", headers=AUTH, json=confirm), 404),
        ("stale version", lambda: client.post(decision, headers=AUTH, json={**confirm, "expected_version": proposal["version"] + 3}), 409),
        ("confirm without name", lambda: client.post(decision, headers=AUTH, json={"action": "confirm", "expected_version": 1}), 422),
        ("unknown action", lambda: client.post(decision, headers=AUTH, json={"action": "approve", "expected_version": 1}), 422),
        ("body not json", lambda: client.post(decision, headers={**AUTH, "Content-Type": "application/json"}, content=b"{oops"), 422),
        ("extra field", lambda: client.post(decision, headers=AUTH, json={**confirm, "force": True}), 422),
        ("non-numeric id", lambda: client.post("/v1/proposals/abc/decision", headers=AUTH, json=confirm), 422),
        ("unknown class", lambda: client.post("/v1/classes/4242/decision", headers=AUTH,
                                              json={"action": "rename", "name": "x", "expected_version": 1}), 404),
        ("split k=1", lambda: client.post(f"/v1/classes/{rust['id']}/decision", headers=AUTH,
                                          json={"action": "split", "k": 1, "expected_version": rust["version"]}), 422),
        ("name in use", lambda: client.post(f"/v1/classes/{rust['id']}/decision", headers=AUTH,
                                            json={"action": "rename", "name": "stain", "expected_version": rust["version"]}), 409),
        ("move unknown regions", lambda: client.post("/v1/regions/move", headers=AUTH, json={"region_ids": [10 ** 9], "class_id": None}), 404),
        ("move nothing", lambda: client.post("/v1/regions/move", headers=AUTH, json={"region_ids": [], "class_id": None}), 422),
        ("undo with nothing done", lambda: client.post("/v1/undo", headers=AUTH), 409),
        ("model folder without predictor", lambda: client.post("/v1/models", headers=AUTH,
                                                               json={"name": "v9", "artifact_path": "/nonexistent"}), 422),
        ("bad proposal filter", lambda: client.get("/v1/proposals?status=bogus"), 422),
    ]
    before = store_fingerprint(client)
    for name, send, expected in bad:
        response = send()
        assert response.status_code == expected, f"{name}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 5, f"{name}: {detail!r}"
    assert len(bad) >= 20
    assert store_fingerprint(client) == before

    answer = client.post("/v1/predict", files=upload(("ok.png", good_png, "image/png")))
    assert answer.status_code == 200 and answer.json()["images"][0]["regions"][0]["label"] == "rust"
    ingested = client.post("/v1/images", headers=AUTH, files=upload(("ok.png", good_png, "image/png")))
    assert ingested.status_code == 200
    assert store_fingerprint(client)["counts"]["Image"] == before["counts"]["Image"] + 1


def test_writes_answer_503_when_the_server_has_no_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    world = build_world(tmp_path / "world")
    core = ServiceCore(ServeSettings.from_args(world.args(model_poll_s=0)))
    with TestClient(create_app(core)) as client:
        response = client.post("/v1/undo", headers=AUTH)
        assert response.status_code == 503 and TOKEN_VARIABLE in response.json()["detail"]
        assert client.get("/healthz").json()["writes_enabled"] is False
    core.close()


def test_unknown_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="max_body"):
        ServeSettings.from_args({"store": "sqlite://", "index": "i", "model": "m", "max_body": 3})
    with pytest.raises(ValueError, match="model"):
        ServeSettings.from_args({"store": "sqlite://", "index": "i"})
