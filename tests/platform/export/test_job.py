"""``adisc export`` and ``adisc report`` from the command line: each format from a work folder or a store URL, and
bad input (unknown format, missing store, unwritable or non-empty output) as one line, exit 1, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from anomaly_discovery.cli import main
from anomaly_discovery.data import save_image
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion, LoopConfig
from anomaly_discovery.platform.storage.store import Store


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, verb: str = "export") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"adisc {verb}: error: "), err
    return lines[0]


@pytest.mark.parametrize("kind", ["csv", "coco", "folder"])
def test_each_format_names_the_model_and_the_newest_decision(world, reviewed, tmp_path, capsys, kind):
    out = tmp_path / "out"
    code, printed, _ = run(capsys, "export", "--workdir", str(world.workdir), "--format", kind, "--out", str(out),
                           "--quiet")
    assert code == 0 and f"decision reflected: #{reviewed.last_decision} rename" in printed
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == kind and manifest["model_version"] == "discovery-1"
    assert manifest["last_decision"]["id"] == reviewed.last_decision and manifest["regions"] == 48
    assert manifest["regions_per_status"] == {"known": 23, "confirmed": 12, "proposed": 0, "unknown": 0,
                                              "rejected": 13}
    expected = {"csv": "regions.csv", "coco": "annotations.json", "folder": "regions.csv"}[kind]
    assert (out / expected).is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_store_url_and_index_can_be_given_instead_of_a_work_folder(world, reviewed, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "export", "--store", world.store, "--index", str(world.index), "--format", "csv",
                     "--out", str(out), "--workdir", str(tmp_path / "nowhere"), "--quiet")
    table = pd.read_csv(out / "regions.csv")
    assert code == 0 and len(table) == 48 and table["outlier_score"].notna().all()


def test_an_unknown_format_is_one_line_and_exit_1(world, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--workdir", str(world.workdir), "--format", "xml", "--out",
                       str(tmp_path / "out"))
    assert code == 1 and "unknown export format 'xml'" in one_line_error(err) and "folder, csv, coco" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_store_is_one_line_and_creates_nothing(tmp_path, capsys):
    code, _, err = run(capsys, "export", "--workdir", str(tmp_path / "empty"), "--format", "csv", "--out",
                       str(tmp_path / "out"))
    assert code == 1 and "no store at" in one_line_error(err) and "adisc demo" in err
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_store_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.db").write_text("not a database")
    code, _, err = run(capsys, "export", "--store", f"sqlite:///{tmp_path / 'junk.db'}", "--format", "csv",
                       "--out", str(tmp_path / "out"))
    assert code == 1 and "cannot read the store" in one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db"]


def test_an_unwritable_output_is_one_line_and_leaves_nothing(world, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    code, _, err = run(capsys, "export", "--workdir", str(world.workdir), "--format", "folder", "--out",
                       str(tmp_path / "a-file" / "out"))
    assert code == 1 and "cannot create the folder" in one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "work"]


def test_a_non_empty_output_is_refused_until_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "export", "--workdir", str(world.workdir), "--format", "coco", "--out", str(out))
    assert code == 1 and "is not empty" in one_line_error(err) and (out / "keep.txt").read_text() == "mine"
    code, _, _ = run(capsys, "export", "--workdir", str(world.workdir), "--format", "coco", "--out", str(out),
                     "--overwrite", "--quiet")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["annotations.json", "export.json"]


def test_report_writes_one_file_and_refuses_to_clobber_or_a_bad_trend(world, reviewed, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, printed, _ = run(capsys, "report", "--workdir", str(world.workdir), "--out", str(out))
    assert code == 0 and out.stat().st_size > 10_000 and f"newest decision #{reviewed.last_decision}" in printed
    code, _, err = run(capsys, "report", "--workdir", str(world.workdir), "--out", str(out))
    assert code == 1 and "exists" in one_line_error(err, "report")
    code, _, err = run(capsys, "report", "--workdir", str(world.workdir), "--out", str(tmp_path / "r2.html"),
                       "--trend", "week")
    assert code == 1 and "unknown trend grouping 'week'" in one_line_error(err, "report")
    code, _, err = run(capsys, "report", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "r3.html"))
    assert code == 1 and "no store at" in one_line_error(err, "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "work"]


def test_a_postgresql_store_exports_by_its_url(postgres_url, tmp_path, capsys, rng):
    """Two known kinds of six regions each in a PostgreSQL store, one region dropped by a reviewer."""
    centres = np.eye(8, dtype=np.float32)[:2]
    images, regions = [], []
    for i in range(12):
        path = tmp_path / "images" / f"{i}.png"
        save_image(path, np.full((32, 32, 3), 100 + i, np.uint8))
        images.append(DiscoveredImage(str(i), str(path), f"hash-{i}"))
        vector = centres[i % 2] + 0.05 * rng.standard_normal(8).astype(np.float32)
        regions.append(DiscoveredRegion(str(i), (4, 4, 12, 12), 0.5, vector, "ab"[i % 2], 0.9))
    index = tmp_path / "index" / "regions.faiss"
    store = Store(postgres_url)
    loop = DiscoveryLoop(store, index, 8, LoopConfig(background_save=False))
    loop.ingest_discovery(images, regions, ("a", "b"), model_version="pg-1")
    dropped = loop.move([1], None, reviewer="ana")
    loop.close()
    store.dispose()
    code, printed, _ = run(capsys, "export", "--store", postgres_url, "--index", str(index), "--format", "coco",
                           "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0 and f"#{dropped.decision_id} move by ana" in printed
    document = json.loads((tmp_path / "out" / "annotations.json").read_text())
    statuses = pd.Series([a["status"] for a in document["annotations"]]).value_counts().to_dict()
    assert statuses == {"known": 11, "rejected": 1} and document["info"]["model_version"] == "pg-1"
    assert all(a["outlier_score"] is not None and a["mask_source"] == "box" for a in document["annotations"])
