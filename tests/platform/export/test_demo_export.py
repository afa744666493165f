"""The issue's end-to-end check: after ``adisc demo --quick`` and review actions through the API (confirm, reject,
split, rename, move a region out, ingest an arrival), every export reflects exactly what the API reports: the
CLI's CSV, COCO and folder exports, ``GET /v1/export``, torchvision's ImageFolder on the folder export, and the HTML
report rendered in headless Chromium."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from anomaly_discovery.cli import main
from anomaly_discovery.platform.service.app import ServeSettings, ServiceCore, create_app
from anomaly_discovery.platform.storage.paths import ServicePaths
from tests.platform.ray_fixtures import TOKEN, TOKEN_VARIABLE
from tests.platform.serve_world import defect_image, png_bytes
from tests.ui.chromium import browser_page

AUTH = {"Authorization": f"Bearer {TOKEN}"}
REVIEWER = "qe-ana"
CONFIRMED, SPLIT_RENAMED = "ring defect", "dark spot"


@dataclass
class Demo:
    workdir: Path
    exports: Path
    classes: dict[str, dict]
    moved_region: int
    last_decision: int
    api_csv: bytes
    api_coco: dict
    api_headers: dict


def decide(client: TestClient, path: str, body: dict) -> dict:
    response = client.post(path, headers=AUTH, json={"reviewer": REVIEWER, **body})
    assert response.status_code == 200, response.text
    return response.json()


def review_through_the_api(client: TestClient) -> tuple[int, int]:
    """Confirm the largest proposal, reject the others, split the new class and rename a part, move one region
    out, ingest an arrival; returns (the moved region, the newest decision id)."""
    proposals = sorted(client.get("/v1/proposals").json(), key=lambda p: -p["size"])
    assert proposals and proposals[0]["size"] >= 4, proposals
    decide(client, f"/v1/proposals/{proposals[0]['id']}/decision",
                       {"action": "confirm", "name": CONFIRMED, "expected_version": proposals[0]["version"]})
    for proposal in client.get("/v1/proposals").json():
        decide(client, f"/v1/proposals/{proposal['id']}/decision",
               {"action": "reject", "expected_version": proposal["version"]})
    classes = {c["name"]: c for c in client.get("/v1/classes").json()}
    decide(client, f"/v1/classes/{classes[CONFIRMED]['id']}/decision",
           {"action": "split", "k": 2, "expected_version": classes[CONFIRMED]["version"]})
    classes = {c["name"]: c for c in client.get("/v1/classes").json()}
    part = classes[f"{CONFIRMED} (2)"]
    decide(client, f"/v1/classes/{part['id']}/decision",
           {"action": "rename", "name": SPLIT_RENAMED, "expected_version": part["version"]})
    table = pd.read_csv(io.BytesIO(client.get("/v1/export?format=csv").content))
    moved = int(table.loc[table["class_name"] == CONFIRMED, "region_id"].iloc[0])
    last = decide(client, "/v1/regions/move", {"region_ids": [moved], "class_id": None})
    ingested = client.post("/v1/images", headers=AUTH,
                           files=[("images", ("arrival.png", png_bytes(defect_image("hole", 5)), "image/png"))])
    assert ingested.status_code == 200, ingested.text
    return moved, last["decision_id"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    workdir = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(workdir), "--n", "60"]) == 0
    paths = ServicePaths(workdir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_VARIABLE, TOKEN)
        core = ServiceCore(ServeSettings.from_args({"store": paths.store_url, "index": str(paths.index),
                                                     "model": str(paths.model), "token_env": TOKEN_VARIABLE,
                                                     "model_poll_s": 0, "sync_interval_s": 0}))
        try:
            with TestClient(create_app(core)) as client:
                moved, last = review_through_the_api(client)
                classes = {c["name"]: c for c in client.get("/v1/classes?all=true").json()}
                csv = client.get("/v1/export?format=csv")
                coco = client.get("/v1/export?format=coco")
        finally:
            core.close()
    assert csv.status_code == coco.status_code == 200
    exports = workdir / "exports"
    for kind in ("csv", "coco", "folder"):
        assert main(["export", "--workdir", str(workdir), "--format", kind, "--out", str(exports / kind),
                     "--quiet"]) == 0
    assert main(["report", "--workdir", str(workdir), "--out", str(exports / "report.html")]) == 0
    return Demo(workdir, exports, classes, moved, last, csv.content, coco.json(), dict(csv.headers))


def live_sizes(demo: Demo) -> dict[str, int]:
    """Regions per class as the API reports them (live classes that hold regions)."""
    return {name: c["size"] for name, c in demo.classes.items()
            if c["status"] in ("known", "confirmed", "proposed") and c["size"] > 0}


def test_the_csv_exports_reflect_every_api_action(demo):
    cli_csv = (demo.exports / "csv" / "regions.csv").read_bytes()
    assert cli_csv == demo.api_csv, "the CLI and the API export the same state byte for byte"
    table = pd.read_csv(io.BytesIO(cli_csv))
    counts = table[table["status"].isin(["known", "confirmed", "proposed"])]["class_name"].value_counts().to_dict()
    assert counts == live_sizes(demo)
    assert {CONFIRMED, SPLIT_RENAMED} <= set(counts) and f"{CONFIRMED} (2)" not in counts
    moved = table.set_index("region_id").loc[demo.moved_region]
    assert (moved["status"], moved["decided_by"], moved["source"]) == ("rejected", REVIEWER, "reviewer")
    discovered = table[table["dataset"] == "discovery"]
    reviewed = discovered[discovered["class_name"].isin([CONFIRMED, SPLIT_RENAMED])]
    assert len(reviewed) >= 3 and (reviewed["status"] == "confirmed").all()
    assert (reviewed["decided_by"] == REVIEWER).all() and (reviewed["source"] == "reviewer").all()
    assert "proposed" not in set(table["status"]), "every proposal was confirmed or rejected"
    arrival = table[table["dataset"] == "arrivals"]
    assert len(arrival) >= 1 and (arrival["decided_by"] == "model").all(), "arrivals are labelled by the model"
    assert (table["reflects_decision_id"] == demo.last_decision).all()
    assert (table["model_version"] == demo.api_headers["x-adisc-model-version"]).all()
    assert demo.api_headers["x-adisc-last-decision"] == str(demo.last_decision)
    assert f"_d{demo.last_decision}.csv" in demo.api_headers["content-disposition"]


def test_the_coco_exports_reflect_every_api_action(demo):
    cli = json.loads((demo.exports / "coco" / "annotations.json").read_text())
    for document in (cli, demo.api_coco):
        assert document["info"]["last_decision"]["id"] == demo.last_decision
        names = {c["id"]: c["name"] for c in document["categories"]}
        per_class = pd.Series([names[a["category_id"]] for a in document["annotations"]
                               if a["status"] in ("known", "confirmed", "proposed")]).value_counts().to_dict()
        assert per_class == live_sizes(demo)
        moved = next(a for a in document["annotations"] if a["id"] == demo.moved_region)
        assert names[moved["category_id"]] == "rejected" and moved["decided_by"] == REVIEWER
    strip = ("date_created", "created_at")
    assert {k: v for k, v in cli["info"].items() if k not in strip} == \
        {k: v for k, v in demo.api_coco["info"].items() if k not in strip}
    assert cli["annotations"] == demo.api_coco["annotations"]


def test_the_folder_export_loads_with_imagefolder_as_the_confirmed_classes(demo):
    datasets = pytest.importorskip("torchvision.datasets")
    manifest = json.loads((demo.exports / "folder" / "export.json").read_text())
    assert manifest["last_decision"]["id"] == demo.last_decision
    dataset = datasets.ImageFolder(str(demo.exports / "folder" / "images" / "classes"))
    confirmed = sorted(name for name, c in demo.classes.items() if c["status"] in ("known", "confirmed")
                       and c["size"] > 0)
    assert dataset.classes == confirmed and {CONFIRMED, SPLIT_RENAMED} <= set(dataset.classes)
    table = pd.read_csv(demo.exports / "folder" / "regions.csv")
    for index, name in enumerate(dataset.classes):
        files = {Path(p).name for p, label in dataset.samples if label == index}
        assert files == {Path(f).name for f in table.loc[table["class_name"] == name, "file"]}
    assert (table.set_index("region_id").loc[demo.moved_region, "file"]).startswith("images/rejected/")


def test_the_html_report_renders_offline_in_chromium_with_the_api_counts(demo):
    report = demo.exports / "report.html"
    requests: list[str] = []
    with browser_page() as page:
        def refuse(route):
            requests.append(route.request.url)
            route.abort()

        page.route("http*://**/*", refuse)
        page.goto(report.as_uri())
        rows = page.locator("#counts tbody tr").evaluate_all(
            "rows => rows.map(r => [r.dataset.class, r.dataset.status, Number(r.dataset.regions)])")
        broken = page.locator("img").evaluate_all("images => images.filter(i => !i.complete || i.naturalWidth === 0)"
                                                  ".map(i => i.alt)")
        crops = page.locator("section.class figure img").count()
        model = page.locator("#model-version").inner_text()
        last = page.locator("#last-decision").inner_text()
    assert requests == [], "the report must not reach the network"
    assert broken == [] and crops >= 6
    shown = {name: regions for name, status, regions in rows if status in ("known", "confirmed", "proposed")}
    assert {name: n for name, n in shown.items() if n > 0} == live_sizes(demo)
    assert model == demo.api_headers["x-adisc-model-version"] and last == str(demo.last_decision)
