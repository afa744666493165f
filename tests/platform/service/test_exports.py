"""``GET /v1/export``: the reviewed state as CSV or COCO JSON over HTTP (TestClient), open to reads without a
token, following the reviewer's decisions, and refusing an unknown format."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from anomaly_discovery.platform.service.app import ServeSettings, ServiceCore, create_app
from tests.platform.ray_fixtures import TOKEN, TOKEN_VARIABLE
from tests.ui.review_world import build_review_world, copy_world

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_review_world(tmp_path_factory.mktemp("export-api-world"))


def client_for(settings) -> tuple[TestClient, ServiceCore]:
    core = ServiceCore(ServeSettings.from_args({"store": settings.store, "index": str(settings.index),
                                                 "model": str(settings.model), "token_env": TOKEN_VARIABLE,
                                                 "model_poll_s": 0, "sync_interval_s": 0}))
    return TestClient(create_app(core)), core


@pytest.fixture
def client(template, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    test_client, core = client_for(copy_world(template, tmp_path / "work"))
    with test_client:
        yield test_client
    core.close()


def csv_of(response) -> pd.DataFrame:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return pd.read_csv(io.BytesIO(response.content))


def test_the_csv_download_names_model_and_decision_and_follows_a_confirm(client):
    first = client.get("/v1/export")
    table = csv_of(first)
    assert len(table) == 48 and set(table["status"]) == {"known", "proposed"}
    assert first.headers["x-adisc-model-version"] == "discovery-1" and first.headers["x-adisc-last-decision"] == ""
    assert 'filename="adisc_csv_discovery-1_d0.csv"' in first.headers["content-disposition"]
    proposal = client.get("/v1/proposals").json()[0]
    decision = client.post(f"/v1/proposals/{proposal['id']}/decision", headers=AUTH, json={
        "action": "confirm", "name": "pit", "expected_version": proposal["version"], "reviewer": "ana"}).json()
    after = client.get("/v1/export?format=csv")
    table = csv_of(after)
    pits = table[table["class_name"] == "pit"]
    assert len(pits) == proposal["size"] and (pits["status"] == "confirmed").all()
    assert (pits["decided_by"] == "ana").all() and (table["reflects_decision_id"] == decision["decision_id"]).all()
    assert after.headers["x-adisc-last-decision"] == str(decision["decision_id"])


def test_the_coco_download_has_a_category_per_class_and_an_annotation_per_region(client):
    response = client.get("/v1/export?format=coco")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    assert len(document["images"]) == 48 and len(document["annotations"]) == 48
    sizes = {c["name"]: c["size"] for c in client.get("/v1/classes").json()}
    names = {c["id"]: c["name"] for c in document["categories"]}
    assert pd.Series([names[a["category_id"]] for a in document["annotations"]]).value_counts().to_dict() == sizes


def test_an_unknown_format_is_a_422_naming_the_choices(client):
    response = client.get("/v1/export?format=xml")
    assert response.status_code == 422 and "format" in response.json()["detail"] and "'csv'" in response.text


def test_reads_are_open_when_writes_are_disabled(template, tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    test_client, core = client_for(copy_world(template, tmp_path / "work"))
    try:
        with test_client:
            assert test_client.post("/v1/undo").status_code == 503
            assert len(csv_of(test_client.get("/v1/export"))) == 48
    finally:
        core.close()
