"""A real discovery serving model for the Serve and dashboard tests: ``adisc demo --quick`` (60 generated images,
PatchCore on the tiny backbone, a 2-epoch discovery model with K estimated, published to a work folder), built
once per session, with what ``adisc discover`` wrote (``assignments.csv``, ``summary.json``) to compare against."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from anomaly_discovery.cli import main
from anomaly_discovery.platform.storage.paths import ServicePaths


@dataclass(frozen=True)
class DiscoveryWorld:
    workdir: Path
    output: str

    @property
    def paths(self) -> ServicePaths:
        return ServicePaths(self.workdir)

    @property
    def data(self) -> Path:
        """The labelled data set that was discovered."""
        return self.workdir / "data" / "bottle"

    def assignments(self) -> list[dict]:
        with open(self.workdir / "discover" / "assignments.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    def summary(self) -> dict:
        return json.loads((self.workdir / "discover" / "summary.json").read_text())

    def region_counts(self) -> Counter:
        """Regions per class as ``adisc discover`` assigned them; ``unknown``: over its outlier threshold (the
        summary's flags: assignments.csv rounds the scores, and a score may sit on the threshold)."""
        return Counter("unknown" if region["is_outlier"] else region["class"]
                       for record in self.summary()["images"] for region in record["regions"])

    def image_counts(self) -> Counter:
        """Images per class as ``adisc discover`` counts them (its image classes)."""
        return Counter(record["class"] for record in self.summary()["images"])


def build_discovery_world(folder: Path) -> DiscoveryWorld:
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["demo", "--quick", "--out", str(folder), "--n", "60"])
    if code != 0:
        raise RuntimeError(f"adisc demo --quick failed ({code}): {printed.getvalue()[-3000:]}")
    return DiscoveryWorld(folder, printed.getvalue())
