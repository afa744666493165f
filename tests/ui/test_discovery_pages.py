"""The dashboard on a real discovery serving model (``adisc demo --quick``'s, tests/discovery_world.py): the
Overview counts what ``adisc discover`` found, the proposals are the discovered classes, and Inspect labels a
region of the run with the discovery model's class."""

from __future__ import annotations

import shutil

import pytest

from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.ui.settings import UISettings
from tests.ui.test_pages import open_page


@pytest.fixture
def discovered(discovery_world, tmp_path, monkeypatch) -> UISettings:
    """This test's own copy of the world's store and index, exported as the ``ADISC_UI_*`` variables."""
    workdir = tmp_path / "work"
    shutil.copytree(discovery_world.paths.service, ServicePaths(workdir).service,
                    ignore=shutil.ignore_patterns(discovery_world.paths.model.name))
    settings = UISettings.for_workdir(workdir, model=discovery_world.paths.model, data=discovery_world.data)
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    return settings


def test_overview_counts_what_adisc_discover_found(discovered, discovery_world):
    app = open_page("overview")
    counts = app.dataframe[0].value
    assert dict(zip(counts["class"], counts["regions"])) == dict(discovery_world.region_counts())
    images = discovery_world.image_counts()
    assert {name: n for name, n in zip(counts["class"], counts["images (model)"]) if name != "unknown"} == \
        {name: images.get(name, 0) for name in counts["class"] if name != "unknown"}
    metrics = {m.label: m.value for m in app.metric}
    discovered_classes = [name for name in discovery_world.region_counts() if name != "unknown"]
    assert metrics["open proposals"] == str(len(discovered_classes))
    assert metrics["model version"].startswith("discovery-")


def test_the_proposals_are_the_discovered_classes_largest_first(discovered, discovery_world):
    app = open_page("proposals")
    counts = discovery_world.region_counts()
    largest = max((n, name) for name, n in counts.items() if name != "unknown")
    assert {m.label: m.value for m in app.metric}["size (regions)"] == str(largest[0])


def test_inspect_labels_a_region_of_the_run_with_the_discovery_model_class(discovered, discovery_world):
    threshold = discovery_world.summary()["outlier_threshold"]
    row = next(r for r in discovery_world.assignments() if float(r["region_outlier_score"]) <= threshold)
    app = open_page("inspect")
    with open(row["image"], "rb") as handle:
        app.file_uploader(key="inspect-upload").set_value(("part.png", handle.read(), "image/png")).run()
    assert not app.exception and not app.error
    assert "new" in set(app.dataframe[0].value["kind"])
