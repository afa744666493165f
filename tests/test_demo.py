from anomaly_discovery.cli import main
from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.platform.storage.store import Store, proposals


def test_quick_demo_runs_every_stage_and_leaves_proposals_for_review(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--n", "60"]) == 0
    out = capsys.readouterr().out
    for stage in ("== generate", "== detect", "== discover", "== publish", "adisc ui --workdir"):
        assert stage in out
    assert "nmi" in out and "image_auroc" in out
    paths = ServicePaths(tmp_path)
    assert paths.index.is_file() and (paths.model / "predictor.json").is_file()
    with Store(paths.store_url).session() as session:
        assert len(proposals(session)) >= 1
