"""``adisc demo --quick`` runs every stage and publishes what discovery found (the session's discovery world)."""

from anomaly_discovery.platform.storage.store import Store, proposals


def test_quick_demo_runs_every_stage_and_leaves_the_discovered_classes_for_review(discovery_world):
    for stage in ("== generate", "== detect", "== discover", "== publish", "adisc ui --workdir"):
        assert stage in discovery_world.output
    assert "nmi" in discovery_world.output and "image_auroc" in discovery_world.output
    paths = discovery_world.paths
    assert paths.index.is_file() and (paths.model / "predictor.json").is_file()
    discovered = {name for name in discovery_world.region_counts() if name != "unknown"}
    store = Store(paths.store_url)
    with store.session() as session:
        assert len(proposals(session)) == len(discovered) >= 2
    store.dispose()
