"""Every manifest in deploy/ parses, names commands and import paths the package has, and the image builds
from pyproject.toml."""

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from anomaly_discovery.cli import build_parser
from anomaly_discovery.platform.ray.retrain import add_retrain_arguments
from anomaly_discovery.platform.ray.train import add_train_arguments
from anomaly_discovery.platform.ray.tune import add_tune_arguments

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAY_VERBS = {"train": add_train_arguments, "tune": add_tune_arguments, "retrain": add_retrain_arguments}
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def manifests() -> dict[Path, list]:
    documents = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        documents[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for document in documents[path]:
            if isinstance(document, dict) and isinstance(document.get("spec", {}).get("serveConfigV2"), str):
                documents[path].append(yaml.safe_load(document["spec"]["serveConfigV2"]))
    return documents


def walk(node, key=None):
    """(key, value) of every scalar in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)
    else:
        yield key, node


def commands(documents) -> list[list[str]]:
    found = []
    for document in documents:
        for _, value in walk(document):
            if isinstance(value, str) and value.strip().startswith("adisc "):
                found.append(shlex.split(value))
    return found


def kinds(documents) -> list[str]:
    return [d.get("kind") for d in documents if isinstance(d, dict)]


ALL = manifests()


def test_every_manifest_parses_and_the_expected_kinds_exist():
    assert ALL, "deploy/ holds no YAML"
    every_kind = [kind for documents in ALL.values() for kind in kinds(documents)]
    assert every_kind.count("RayJob") >= 2 and {"RayCluster", "RayService"} <= set(every_kind)
    launcher = ALL[DEPLOY / "cluster.yaml"][0]
    workers = launcher["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["min_workers"] <= workers["max_workers"]
    assert launcher["head_node_type"] in launcher["available_node_types"]


@pytest.mark.parametrize("path", sorted(ALL), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_adisc_command_line_parses_with_the_package_arguments(path):
    verbs = build_parser()._subparsers._group_actions[0].choices
    for argv in commands(ALL[path]):
        verb = argv[1]
        assert verb in verbs, f"{path.name}: `adisc {verb}` is not a verb of the CLI"
        if verb in RAY_VERBS:
            parser = argparse.ArgumentParser(prog=f"adisc {verb}")
            RAY_VERBS[verb](parser)
            parser.parse_args(argv[2:])
        else:
            build_parser().parse_args(argv[1:])


def test_jobs_join_the_cluster_they_run_on():
    for path, documents in ALL.items():
        for argv in commands(documents):
            if argv[1] in RAY_VERBS:
                assert argv[argv.index("--address") + 1] == "auto", f"{path.name}: {' '.join(argv)}"


@pytest.mark.parametrize("path", sorted(ALL), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_import_path_imports(path):
    for key, value in walk(ALL[path]):
        if key == "import_path":
            assert IMPORT_PATH.match(value), f"{path.name}: malformed import_path {value!r}"
            module, attribute = value.split(":")
            assert callable(getattr(importlib.import_module(module), attribute)), value


def test_the_rayservice_serves_the_same_application_as_serve_config_with_valid_arguments():
    pytest.importorskip("ray.serve")
    from anomaly_discovery.platform.service.app import ServeSettings

    def applications(path):
        return [app for d in ALL[path] if isinstance(d, dict) for app in d.get("applications", [])]

    served = applications(DEPLOY / "kuberay" / "rayservice.yaml")
    reference = applications(DEPLOY / "serve_config.yaml")
    assert [a["import_path"] for a in served] == [a["import_path"] for a in reference]
    for app in served:
        ServeSettings.from_args(app["args"])


def serve_applications() -> list[tuple[Path, dict]]:
    return [(path, app) for path, documents in ALL.items() for d in documents if isinstance(d, dict)
            for app in d.get("applications", [])]


def test_serve_applications_use_the_paths_the_service_uses():
    pytest.importorskip("ray.serve")
    from anomaly_discovery.platform.service.core import ServeSettings
    from anomaly_discovery.platform.storage.paths import ServicePaths

    assert serve_applications(), "deploy/ holds no Serve application"
    for path, app in serve_applications():
        args = app["args"]
        assert args.get("workdir"), f"{path.name}: the application names no workdir"
        settings, paths = ServeSettings.from_args(args), ServicePaths(Path(args["workdir"]))
        assert (settings.index, settings.model) == (str(paths.index), str(paths.model)), path.name
        assert settings.store == paths.store_url or settings.store.startswith("postgresql"), path.name


def test_the_cluster_jobs_and_the_service_share_one_work_folder():
    served = {app["args"]["workdir"] for path, app in serve_applications() if "kuberay" in path.parts}
    for path, documents in ALL.items():
        for argv in commands(documents):
            if "--workdir" in argv:
                assert {argv[argv.index("--workdir") + 1]} == served, f"{path.name}: {' '.join(argv)}"


def test_the_dockerfile_installs_the_package_from_pyproject():
    text = (DEPLOY / "Dockerfile").read_text()
    steps = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    copied = [part for step in steps if step[0] == "COPY" for part in step[1:-1]]
    assert "pyproject.toml" in copied and "anomaly_discovery" in copied
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
    assert re.search(r"pip install \.(\s|$)", text)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["adisc"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
