"""A discovery run enters the store with the discovery model's own assignments (SQLite and PostgreSQL): each novel
cluster a proposed class with its proposal, the model's outliers unknown, images with the model's image class;
more of the same run joins those classes; a run of another model is refused; and predictions take the model's
class, followed through a reviewer's merge."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_discovery.platform.predictor import PredictedRegion
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.storage.models import ClassStatus
from anomaly_discovery.platform.storage.store import Store, current_assignments, proposals

DIM = 16


def clustered_run(prefix: str, sizes: dict[int, int], outliers: int = 0, seed: int = 0):
    """``sizes[c]`` regions of cluster ``c`` (one per image, image class ``c``) and ``outliers`` regions the model
    put in cluster 0 but flagged as over its threshold."""
    rng = np.random.default_rng(seed)
    centres = np.eye(DIM)[:max(sizes) + 1]
    images, regions = [], []
    for cluster, n in sizes.items():
        for i in range(n + (outliers if cluster == 0 else 0)):
            key = f"{prefix}{cluster}_{i}"
            images.append(DiscoveredImage(key, f"/data/{key}.png", f"hash-{key}", cluster=cluster))
            regions.append(DiscoveredRegion(key, (0, 0, 8, 8), 0.8, centres[cluster] + 0.05 * rng.standard_normal(DIM),
                                            confidence=0.7, cluster=cluster, is_outlier=i >= n))
    return images, regions


@pytest.fixture
def loop(database_url, tmp_path):
    loop = DiscoveryLoop(Store(database_url), tmp_path / "index.npz", DIM)
    yield loop
    loop.close()
    loop.store.dispose()


def sizes_by_name(loop: DiscoveryLoop) -> dict[str, int]:
    return {loop.classes[c].name: n for c, n in loop.class_sizes().items()}


def test_the_first_assignment_is_the_discovery_model_own(loop):
    loop.ingest_discovery(*clustered_run("a", {0: 6, 1: 4, 2: 5}, outliers=2), model_version="run-1")
    assert sizes_by_name(loop) == {"novel_0": 6, "novel_1": 4, "novel_2": 5}
    assert int((loop.mirror.class_id[loop.mirror.source >= 0] == -1).sum()) == 2, "the model's outliers are unknown"
    with loop.store.session() as session:
        opened = sorted((loop.classes[p.class_id].name, p.size) for p in proposals(session))
        sources = {a.source.value for a in current_assignments(session).values()}
    assert opened == [("novel_0", 6), ("novel_1", 4), ("novel_2", 5)] and sources == {"model"}
    assert {loop.classes[c].name: n for c, n in loop.image_counts().items()} == {"novel_0": 8, "novel_1": 4,
                                                                                "novel_2": 5}
    assert all(c.status == ClassStatus.PROPOSED for c in loop.classes.values())


def test_more_of_the_same_run_joins_the_classes_its_clusters_stand_for(loop):
    loop.ingest_discovery(*clustered_run("a", {0: 6, 1: 4}), model_version="run-1")
    loop.ingest_discovery(*clustered_run("b", {0: 3, 1: 0}, seed=1), model_version="run-1")
    assert sizes_by_name(loop) == {"novel_0": 9, "novel_1": 4}
    with loop.store.session() as session:
        assert sorted(p.size for p in proposals(session)) == [4, 9]


def test_a_run_of_another_model_is_refused(loop):
    loop.ingest_discovery(*clustered_run("a", {0: 3}), model_version="run-1")
    with pytest.raises(ValueError, match="serves model 'run-1'"):
        loop.ingest_discovery(*clustered_run("b", {0: 3}), model_version="run-2")


def test_predictions_take_the_model_class_and_follow_a_merge(loop):
    loop.ingest_discovery(*clustered_run("a", {0: 6, 1: 4}), model_version="run-1")
    elsewhere = np.eye(DIM)[9].astype(np.float32)
    region = PredictedRegion((0, 0, 8, 8), elsewhere, 0.9, class_index=1, is_outlier=False)
    outlier = PredictedRegion((0, 0, 8, 8), elsewhere, 0.9, class_index=1, is_outlier=True)
    novel_0 = next(c.id for c in loop.classes.values() if c.name == "novel_0")
    novel_1 = next(c.id for c in loop.classes.values() if c.name == "novel_1")
    label, flagged = loop.label_predictions([region, outlier])
    assert (label.kind, label.class_id) == ("new", novel_1), "the model's cluster, wherever its embedding lies"
    assert (flagged.kind, flagged.class_id) == ("unknown", None), "over the model's threshold: the index decides"
    proposal = next(p for class_id, p in loop.open_proposals.items() if class_id == novel_0)
    loop.confirm(proposal, "chip", reviewer="ana")
    loop.merge(novel_1, novel_0, reviewer="ana")
    assert [(lab.kind, lab.name, lab.class_id) for lab in loop.label_predictions([region])] == \
        [("class", "chip", novel_0)], "cluster 1's class was merged into the confirmed chip"
