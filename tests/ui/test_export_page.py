"""The dashboard's exports: the Export page's downloads (CSV, COCO JSON, folder ZIP, HTML report) and the
Overview's Pareto and trend downloads, under ``AppTest``; the files come from the service the buttons call."""

from __future__ import annotations

import io
import json
import zipfile

import pandas as pd

from anomaly_discovery.ui.service import ReviewService
from tests.ui.test_pages import open_page, success


def labels(app) -> dict[str, str]:
    return {button.key: button.label for button in app.download_button}


def test_the_export_page_offers_every_format_and_says_what_it_reflects(world):
    app = open_page("export")
    assert labels(app) == {"export-csv": "Regions (CSV)", "export-coco": "COCO JSON",
                           "export-folder": "Folder per class (ZIP)", "export-report": "Report (HTML)"}
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["regions"] == "48" and metrics["known"] == "24" and metrics["proposed"] == "24"
    assert any("discovery-1" in m.value and "none yet" in m.value for m in app.markdown)


def test_the_downloads_follow_a_confirm_made_on_the_proposals_page(world):
    app = open_page("proposals")
    app.text_input(key=f"confirm-name-{app.session_state['proposal']}").input("pit")
    app.button(key="confirm").click().run()
    assert "confirm" in success(app)
    service = ReviewService(world)
    try:
        table = pd.read_csv(io.BytesIO(service.export_file("csv")))
        assert (table["class_name"] == "pit").sum() == 12 and set(table["status"]) == {"known", "confirmed",
                                                                                      "proposed"}
        coco = json.loads(service.export_file("coco"))
        assert "pit" in {c["name"] for c in coco["categories"]}
        with zipfile.ZipFile(io.BytesIO(service.export_file("folder"))) as archive:
            names = archive.namelist()
            manifest = json.loads(archive.read("export.json"))
        assert sum(n.startswith("images/classes/pit/") for n in names) == 12
        assert sum(n.startswith("masks/classes/pit/") for n in names) == 12
        assert manifest["last_decision"]["action"] == "confirm" and manifest["format"] == "folder"
        report = service.report_file().decode()
        assert 'data-class="pit" data-status="confirmed" data-regions="12"' in report
    finally:
        service.loop.close()
        service.store.dispose()
    page = open_page("export")
    assert any("newest decision **#1**" in m.value for m in page.markdown)


def test_the_overview_offers_the_pareto_and_trend_as_png_and_csv(world):
    app = open_page("overview")
    assert set(labels(app)) == {"pareto-png", "pareto-csv", "trend-png", "trend-csv"}
    counts = app.dataframe[0].value
    assert list(counts.columns) == ["class", "status", "regions", "share %", "cumulative %", "images (model)"]
