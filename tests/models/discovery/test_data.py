import numpy as np

from anomaly_discovery.models.discovery.data import split_base
from anomaly_discovery.models.localisation.regions import Region


def crop(image_id: str, class_name: str) -> Region:
    return Region(image_id, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), np.ones((8, 8), bool),
                  (0, 0, 8, 8), 1.0, 64, (8, 8), class_name)


def test_base_validation_holds_out_whole_images_of_every_class():
    # two crops per image, ten images per class: about 15% of each class's crops, never one image on both sides
    regions = [crop(f"{name}-{i}", name) for name in ("hole", "scratch") for i in range(10) for _ in range(2)]
    train, val = split_base(regions, 0.15, seed=0)
    assert len(train) + len(val) == len(regions)
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    for name in ("hole", "scratch"):
        held = [r for r in val if r.class_name == name]
        assert 3 <= len(held) <= 4 and len(held) % 2 == 0


def test_a_class_from_a_single_image_keeps_it_for_training():
    regions = [crop("only", "hole") for _ in range(4)] + [crop(f"s{i}", "scratch") for i in range(4)]
    train, val = split_base(regions, 0.5, seed=0)
    assert [r.class_name for r in val] == ["scratch", "scratch"]
    assert sum(r.class_name == "hole" for r in train) == 4
