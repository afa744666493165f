"""Where exports are written: refused outputs, replacement with --overwrite, and nothing left behind on failure."""

from __future__ import annotations

import os

import pytest

from anomaly_discovery.platform.export.output import ExportError, staged_folder, write_file


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_finished_export_appears_whole_and_nothing_else_is_left(tmp_path):
    with staged_folder(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists(), "the output must not exist before the export is complete"
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert leftovers(tmp_path) == ["out"]


def test_a_failing_export_leaves_no_output_and_no_partial_folder(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_folder(tmp_path / "out") as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert leftovers(tmp_path) == []


def test_a_non_empty_folder_is_refused_unless_overwrite_and_then_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="is not empty.*--overwrite"):
        with staged_folder(out):
            pass
    assert leftovers(out) == ["old.txt"]
    with staged_folder(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert leftovers(out) == ["new.txt"] and leftovers(tmp_path) == ["out"]


def test_an_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    with staged_folder(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
    assert leftovers(tmp_path / "out") == ["a.txt"]


def test_an_output_under_a_file_is_refused_with_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="cannot create the folder .*file"):
        with staged_folder(tmp_path / "file" / "out"):
            pass
    with pytest.raises(ExportError, match="is a file, not a folder"):
        with staged_folder(tmp_path / "file"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ExportError, match="permission denied"):
            with staged_folder(parent / "out"):
                pass
    finally:
        parent.chmod(0o755)


def test_write_file_replaces_only_with_overwrite_and_leaves_no_temporary(tmp_path):
    path = write_file(tmp_path / "report.html", b"one")
    with pytest.raises(ExportError, match="exists.*--overwrite"):
        write_file(path, b"two")
    write_file(path, b"two", overwrite=True)
    assert path.read_bytes() == b"two" and leftovers(tmp_path) == ["report.html"]
    with pytest.raises(ExportError, match="is a folder"):
        write_file(tmp_path, b"x")
