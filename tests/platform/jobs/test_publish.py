import pytest

from anomaly_discovery.platform.jobs.detect import DetectConfig, DetectSummary
from anomaly_discovery.platform.jobs.publish import publish_discovery
from anomaly_discovery.platform.storage.paths import ServicePaths


@pytest.mark.parametrize("detector", ["prn", "ensemble", "zero-shot"])
def test_only_a_patchcore_detection_is_published_and_a_refusal_keeps_the_published_state(tmp_path, detector):
    """The service loads a PatchCore bank: a saved PRN under its name would fail only when the service starts; and
    a refused publish, even one asked to replace, leaves the service state already there as it was."""
    kept = ServicePaths(tmp_path / "work").service / "adisc.db"
    kept.parent.mkdir(parents=True)
    kept.write_text("published earlier")
    detection = DetectSummary(DetectConfig(data=tmp_path, out=tmp_path / "detect", detector=detector), results=[],
                              n_fit_images=0, held_out=[], prior_used="none", detector=object())
    with pytest.raises(ValueError, match=f"the {detector} detector cannot be saved for serving"):
        publish_discovery(detection, None, tmp_path / "work", replace=True)
    assert kept.read_text() == "published earlier"
    assert not ServicePaths(tmp_path / "work").model.exists()
