import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomaly_discovery.models.detectors.ensemble import (BLUR_REFERENCE_SIDE, MIN_CALIBRATION, PATCHCORE_BACKBONES,
                                                         DetectorEnsemble, MemberScale, average_detections,
                                                         blurred_map, calibration_split, kind_weights, member_scale,
                                                         standardised, to_score_space)
from anomaly_discovery.models.detectors.patchcore import PatchCoreDetector
from anomaly_discovery.models.detectors.protocol import Detection, Detector
from anomaly_discovery.models.detectors.prn import PRNConfig, PRNDetector

from .test_patchcore import SIZE, texture, with_blob


def signal(image: np.ndarray) -> np.ndarray:
    """The common evidence the fake members below report, each on its own scale: brightness."""
    return image.astype(np.float64) / 255.0


class AffineMember:
    """A fake distance detector: its map is ``gain`` × brightness + ``offset``; score its map's maximum."""

    name = "affine"
    image_size = 32

    def __init__(self, gain: float, offset: float):
        self.gain, self.offset, self.fitted_on = gain, offset, None

    def fit(self, normal_images):
        self.fitted_on = [id(image) for image in normal_images]
        return self

    def predict(self, images):
        maps = [(self.gain * signal(image) + self.offset).astype(np.float32) for image in images]
        return [Detection(float(m.max()), m) for m in maps]


class ProbabilityMember(AffineMember):
    """A fake PRN: probabilities σ(gain × brightness + offset); it also records the real anomalies it got."""

    name = "prn"
    image_size = 64

    def fit(self, normal_images, real_anomalies=None):
        self.real_anomalies = real_anomalies
        return super().fit(normal_images)

    def predict(self, images):
        logits = [self.gain * signal(image) + self.offset for image in images]
        return [Detection(float(1 / (1 + np.exp(-z.max()))), (1 / (1 + np.exp(-z))).astype(np.float32)) for z in logits]


def gray_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(60, 200, (SIZE, SIZE)).astype(np.uint8) for _ in range(n)]


def test_probabilities_become_log_odds_and_distances_stay():
    assert to_score_space(np.array([0.5]), True)[0] == pytest.approx(0.0)
    assert to_score_space(np.array([0.9]), True)[0] == pytest.approx(np.log(9.0))
    assert np.isfinite(to_score_space(np.array([0.0, 1.0]), True)).all()
    assert to_score_space(np.array([3.5]), False)[0] == 3.5


def test_member_scale_is_the_mean_and_spread_of_normal_pixels_and_scores():
    detections = [Detection(1.0, np.zeros((2, 2), np.float32)), Detection(3.0, np.full((2, 2), 2.0, np.float32))]
    scale = member_scale(detections, probabilities=False)
    assert (scale.pixel_mean, scale.pixel_std) == (1.0, 1.0)
    assert scale.image_mean == 2.0 and scale.image_std == pytest.approx(np.sqrt(2.0))


def test_standardised_detection_is_a_z_score_against_the_normal_statistics():
    scale = MemberScale(pixel_mean=1.0, pixel_std=2.0, image_mean=4.0, image_std=0.5)
    z = standardised(Detection(5.0, np.array([[1.0, 5.0]], np.float32)), scale, probabilities=False)
    assert z.score == pytest.approx(2.0)
    np.testing.assert_allclose(z.anomaly_map, [[0.0, 2.0]])


def test_maps_of_different_sizes_for_one_image_are_refused():
    with pytest.raises(ValueError, match="different sizes"):
        average_detections([[Detection(0.0, np.zeros((4, 4), np.float32))],
                            [Detection(0.0, np.zeros((4, 5), np.float32))]])


def test_every_kind_weighs_the_same_and_seeds_of_one_kind_share_its_weight():
    np.testing.assert_allclose(kind_weights(["patchcore", "prn"]), [0.5, 0.5])
    np.testing.assert_allclose(kind_weights(["patchcore", "prn", "prn"]), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(kind_weights(["prn", "a", "prn", "b"]), [1 / 6, 1 / 3, 1 / 6, 1 / 3])


def test_weighted_average_of_detections_and_bad_weights_are_refused():
    ones, threes = Detection(1.0, np.ones((2, 2), np.float32)), Detection(3.0, np.full((2, 2), 3.0, np.float32))
    [combined] = average_detections([[ones], [threes]], weights=[3.0, 1.0])
    assert combined.score == pytest.approx(1.5)
    np.testing.assert_allclose(combined.anomaly_map, np.full((2, 2), 1.5))
    assert average_detections([[ones], [threes]])[0].score == pytest.approx(2.0)
    assert average_detections([[ones], [threes]], weights=[1.0, 0.0])[0].score == pytest.approx(1.0)
    for bad in ([1.0], [0.0, 0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="one weight ≥ 0 per member"):
            average_detections([[ones], [threes]], weights=bad)


def test_default_members_hold_one_prn_per_seed_sharing_prns_half():
    single = DetectorEnsemble(seed=2, patchcore_backbones=("mobilenet_v2",))
    assert [m.name for m in single.members] == ["patchcore", "prn"] and single.members[1].config.seed == 2
    pair = DetectorEnsemble(prn_seeds=(0, 1), patchcore_backbones=("mobilenet_v2",))
    assert [m.name for m in pair.members] == ["patchcore", "prn", "prn"]
    assert [m.config.seed for m in pair.members[1:]] == [0, 1]
    np.testing.assert_allclose(pair.weights, [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="prn_seeds"):
        DetectorEnsemble(members=(AffineMember(1, 0), AffineMember(2, 0)), prn_seeds=(0, 1))


def test_default_patchcores_run_on_both_backbones_at_mobilenets_strides_sharing_patchcores_half():
    ensemble = DetectorEnsemble(seed=1)
    patchcores = ensemble.members[:2]
    assert [m.name for m in ensemble.members] == ["patchcore", "patchcore", "prn"]
    assert tuple(m.backbone for m in patchcores) == PATCHCORE_BACKBONES == ("mobilenet_v2", "efficientnet_lite0")
    assert [m.extractor.strides for m in patchcores] == [(8, 16), (8, 16)]
    assert all(m.seed == 1 for m in patchcores)
    np.testing.assert_allclose(ensemble.weights, [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="patchcore_backbones"):
        DetectorEnsemble(members=(AffineMember(1, 0), AffineMember(2, 0)), patchcore_backbones=("mobilenet_v2",))


def test_two_seeds_of_one_kind_weigh_as_much_as_the_other_kind():
    """PatchCore-like evidence against two PRN-like members that disagree: the PatchCore kind keeps half."""
    normals, tests = gray_images(40, 0), gray_images(2, 1)
    members = (AffineMember(gain=50.0, offset=3.0), ProbabilityMember(gain=4.0, offset=-6.0),
               ProbabilityMember(gain=-4.0, offset=6.0))
    ensemble = DetectorEnsemble(members=members, calibration_fraction=0.25).fit(normals)
    per_member = ensemble.predict_members(tests)
    alone = [[standardised(d, scale, m.name == "prn") for d in detections]
             for m, scale, detections in zip(ensemble.members, ensemble.scales_, per_member)]
    without_third = ensemble.combine(per_member, weights=(0.5, 0.5, 0.0))
    for i, together in enumerate(ensemble.combine(per_member)):
        expected = 0.5 * alone[0][i].anomaly_map + 0.25 * (alone[1][i].anomaly_map + alone[2][i].anomaly_map)
        np.testing.assert_allclose(together.anomaly_map, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(without_third[i].anomaly_map, 0.5 * (alone[0][i].anomaly_map
                                                                         + alone[1][i].anomaly_map),
                                   rtol=1e-4, atol=1e-4)


def test_calibration_share_is_disjoint_from_the_fit_share_and_never_below_its_minimum():
    fit, calibration = calibration_split(30, 0.1, seed=0)
    assert len(calibration) == MIN_CALIBRATION and len(fit) == 30 - MIN_CALIBRATION
    assert not set(fit) & set(calibration) and set(fit) | set(calibration) == set(range(30))
    fit, calibration = calibration_split(200, 0.1, seed=0)
    assert len(calibration) == 20
    with pytest.raises(ValueError, match=f"at least {2 * MIN_CALIBRATION} normal images"):
        calibration_split(2 * MIN_CALIBRATION - 1, 0.1, seed=0)


def test_members_on_different_scales_average_to_their_common_evidence():
    """Two members report the same evidence, one as an affine distance and one as a probability: after
    standardisation on the calibration normals both give the same z-scores, so the ensemble does too."""
    normals, tests = gray_images(40, 0), gray_images(3, 1)
    distance, probability = AffineMember(gain=50.0, offset=3.0), ProbabilityMember(gain=4.0, offset=-6.0)
    ensemble = DetectorEnsemble(members=(distance, probability), calibration_fraction=0.25).fit(normals)
    per_member = ensemble.predict_members(tests)
    combined = ensemble.predict(tests)
    for member, scale, detections in zip(ensemble.members, ensemble.scales_, per_member):
        for detection, together in zip(detections, combined):
            alone = standardised(detection, scale, member.name == "prn")
            np.testing.assert_allclose(together.anomaly_map, alone.anomaly_map, rtol=1e-4, atol=1e-4)
            assert together.score == pytest.approx(alone.score, abs=1e-4)
    assert ensemble.image_size == 64 and ensemble.n_calibration_ == 10


def test_members_fit_on_the_same_images_without_the_calibration_share_and_prn_gets_the_real_anomalies():
    normals = gray_images(20, 0)
    real = [(normals[0], np.ones((SIZE, SIZE), bool))]
    distance, probability = AffineMember(1.0, 0.0), ProbabilityMember(1.0, 0.0)
    DetectorEnsemble(members=(distance, probability), seed=3).fit(normals, real_anomalies=real)
    assert distance.fitted_on == probability.fitted_on and len(distance.fitted_on) == 20 - MIN_CALIBRATION
    assert probability.real_anomalies is real


def point_map(side: int) -> np.ndarray:
    image = np.zeros((side, side), np.float32)
    image[side // 2, side // 2] = 1.0
    return image


def test_blur_spreads_a_point_by_sigma_scaled_to_the_maps_shorter_side():
    np.testing.assert_array_equal(blurred_map(point_map(64), 0.0), point_map(64))
    for side in (BLUR_REFERENCE_SIDE, BLUR_REFERENCE_SIDE // 2):
        spread = blurred_map(point_map(side), 4.0)
        offsets = np.arange(side) - side // 2
        row = spread[side // 2] / spread[side // 2].sum()
        measured = np.sqrt((row * offsets ** 2).sum())
        assert measured == pytest.approx(4.0 * side / BLUR_REFERENCE_SIDE, rel=0.05)
        assert spread.sum() == pytest.approx(1.0, rel=1e-3)  # mass kept away from the borders
    with pytest.raises(ValueError, match="sigma"):
        blurred_map(point_map(8), -1.0)


def test_ensemble_blurs_its_averaged_map_and_leaves_image_scores_alone():
    normals, tests = gray_images(40, 0), gray_images(2, 1)
    members = (AffineMember(gain=50.0, offset=3.0), ProbabilityMember(gain=4.0, offset=-6.0))
    sharp = DetectorEnsemble(members=members, calibration_fraction=0.25).fit(normals)
    blurred = DetectorEnsemble(members=members, calibration_fraction=0.25, blur_sigma=4.0).fit(normals)
    per_member = sharp.predict_members(tests)
    for plain, smooth in zip(sharp.combine(per_member), blurred.predict(tests)):
        assert smooth.score == pytest.approx(plain.score)
        np.testing.assert_allclose(smooth.anomaly_map, blurred_map(plain.anomaly_map, 4.0), rtol=1e-5, atol=1e-5)
        assert smooth.anomaly_map.std() < plain.anomaly_map.std()
    np.testing.assert_allclose(sharp.combine(per_member, 4.0)[0].anomaly_map, blurred.predict(tests)[0].anomaly_map,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="blur_sigma"):
        DetectorEnsemble(members=members, blur_sigma=-0.5)


def test_prediction_before_fit_and_a_single_member_are_refused():
    with pytest.raises(RuntimeError, match="before fit"):
        DetectorEnsemble(members=(AffineMember(1, 0), AffineMember(2, 0))).predict(gray_images(1, 0))
    with pytest.raises(ValueError, match="at least two members"):
        DetectorEnsemble(members=(AffineMember(1, 0),))
    with pytest.raises(ValueError, match="calibration_fraction"):
        DetectorEnsemble(members=(AffineMember(1, 0), AffineMember(2, 0)), calibration_fraction=1.0)


def test_patchcore_and_prn_together_find_blobs_on_a_texture():
    normals = [texture(seed) for seed in range(20)]
    rng = np.random.default_rng(0)
    real = [with_blob(texture(300 + i), *rng.integers(12, SIZE - 12, 2)) for i in range(4)]
    members = (PatchCoreDetector("tiny", image_size=SIZE, coreset_ratio=0.25, device="cpu", progress=False),
               PRNDetector(PRNConfig(encoder="tiny", image_size=SIZE, epochs=4, steps_per_epoch=5, batch_size=8,
                                     n_prototypes=16, anomaly_pool=24, progress=False, device="cpu")))
    ensemble = DetectorEnsemble(members=members).fit(normals, real_anomalies=real)
    assert isinstance(ensemble, Detector)
    blobs = [with_blob(texture(200 + i), 20 + 6 * i, 40 - 6 * i) for i in range(4)]
    held = [texture(100 + i) for i in range(4)] + [image for image, _ in blobs]
    masks = [np.zeros((SIZE, SIZE), bool)] * 4 + [mask for _, mask in blobs]
    detections = ensemble.predict(held)
    assert all(d.anomaly_map.shape == (SIZE, SIZE) and d.anomaly_map.dtype == np.float32 for d in detections)
    assert roc_auc_score([0] * 4 + [1] * 4, [d.score for d in detections]) == 1.0
    pixels = np.concatenate([d.anomaly_map.ravel() for d in detections])
    assert roc_auc_score(np.concatenate([m.ravel() for m in masks]), pixels) > 0.9
