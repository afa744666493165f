"""Every committed results file is written by its script alone: its top-level keys are exactly the script's
``RESULT_KEYS`` (read from the script's source, so no benchmark runs here), tagged runs included; and the shared
writer (``benchmarks/results_file.py``) refuses any other payload and writes atomically."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"


def declared_keys(script: Path) -> list[str] | None:
    """The literal ``RESULT_KEYS`` tuple/list of a script, or ``None`` when it declares none."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RESULT_KEYS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def results_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def script_of(path: Path) -> Path:
    """``results/<name>.json`` and ``results/<name>.<tag>.json`` come from ``benchmarks/<name>.py``."""
    return BENCHMARKS / f"{path.name.split('.')[0]}.py"


def load_writer():
    spec = importlib.util.spec_from_file_location("results_file", BENCHMARKS / "results_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", results_files(), ids=lambda p: p.name)
def test_each_results_file_has_exactly_the_keys_its_script_writes(path):
    script = script_of(path)
    assert script.is_file(), f"{path.name} has no script {script.name} in benchmarks/"
    keys = declared_keys(script)
    assert keys is not None, f"{script.name} declares no RESULT_KEYS"
    assert set(json.loads(path.read_text())) == set(keys), f"{path.name} does not hold exactly {script.name}'s keys"


def test_every_script_with_results_declares_its_keys_and_writes_through_the_shared_writer():
    scripts = {script_of(path) for path in results_files()}
    assert scripts, "no benchmark script with a results file found"
    for script in sorted(scripts):
        assert declared_keys(script), f"{script.name} declares no RESULT_KEYS"
        source = script.read_text()
        assert "write_results(" in source and ".write_text(json" not in source, \
            f"{script.name} must write its results with results_file.write_results"


def test_the_writer_refuses_other_keys_and_names_them(tmp_path):
    writer = load_writer()
    with pytest.raises(ValueError, match=r"missing \['b'\], not declared \['c'\]"):
        writer.write_results("demo", {"a": 1, "c": 2}, ("a", "b"), out=tmp_path / "x.json")
    assert not list(tmp_path.iterdir()), "nothing is written when the keys are wrong"


def test_the_writer_writes_atomically_and_a_tag_goes_to_its_own_file(tmp_path, monkeypatch):
    writer = load_writer()
    monkeypatch.setattr(writer, "RESULTS", tmp_path)
    plain = writer.write_results("demo", {"a": 1}, ("a",))
    tagged = writer.write_results("demo", {"a": 2}, ("a",), tag="depth4")
    assert (plain.name, tagged.name) == ("demo.json", "demo.depth4.json")
    assert json.loads(plain.read_text()) == {"a": 1} and json.loads(tagged.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.depth4.json", "demo.json"], "no temporary file left"
    with pytest.raises(ValueError, match="--tag"):
        writer.results_path("demo", "../escape")


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    writer = load_writer()
    target = tmp_path / "r.json"
    writer.write_results("demo", {"a": 1}, ("a",), out=target)
    with pytest.raises(TypeError):
        writer.write_results("demo", {"a": object()}, ("a",), out=target)
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
