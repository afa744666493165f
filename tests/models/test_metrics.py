import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score, roc_curve

from anomaly_discovery.models.metrics import (
    ari,
    aupro,
    cluster_accuracy,
    clustering_report,
    f1_macro,
    f1_micro,
    fpr_at_tpr,
    hungarian_mapping,
    image_auroc,
    nmi,
    pixel_auroc,
)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def blob_masks_and_maps(rng):
    """Six 24×32 images: two defect-free, four with 1–3 random discs; maps = noise + signal on defects."""
    masks, maps = [], []
    rows, cols = np.mgrid[:24, :32]
    for index in range(6):
        mask = np.zeros((24, 32), dtype=bool)
        for _ in range(0 if index < 2 else int(rng.integers(1, 4))):
            centre_row, centre_col, radius = rng.integers(0, 24), rng.integers(0, 32), rng.integers(2, 6)
            mask |= (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius**2
        masks.append(mask)
        maps.append(rng.random((24, 32)) + 0.6 * mask * rng.random((24, 32)))
    return masks, maps


def reference_aupro(masks, maps, thresholds, fpr_limit=0.3):
    """Straightforward PRO curve: re-threshold every map at every threshold, region by region."""
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labelled == k for k in range(1, count + 1)])
    normal_total = sum(int((~mask).sum()) for mask in masks)
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(thresholds, reverse=True):
        overlaps, false_positives = [], 0
        for mask, anomaly_map, image_regions in zip(masks, maps, regions):
            detected = anomaly_map >= threshold
            false_positives += int((detected & ~mask).sum())
            overlaps += [detected[region].mean() for region in image_regions]
        fprs.append(false_positives / normal_total)
        pros.append(float(np.mean(overlaps)))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    end = int(keep.sum())
    pro_at_limit = np.interp(fpr_limit, fprs[end - 1 : end + 1], pros[end - 1 : end + 1])
    x = np.append(fprs[keep], fpr_limit)
    y = np.append(pros[keep], pro_at_limit)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


# ---- clustering ----


def test_hungarian_accuracy_of_a_permuted_labelling_is_one():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([2, 2, 0, 0, 1, 1, 1])
    assert cluster_accuracy(y_true, y_pred) == 1.0
    assert hungarian_mapping(y_true, y_pred) == {2: 0, 0: 1, 1: 2}


def test_cluster_accuracy_on_a_six_sample_hand_case():
    # counts w[pred, true]: pred 0 -> {true 0: 1, true 1: 3}; pred 1 -> {true 0: 2, true 1: 0}.
    # Best matching: pred 1 -> 0 (2 right) and pred 0 -> 1 (3 right): 5 of 6 right.
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [1, 1, 0, 0, 0, 0]
    assert hungarian_mapping(y_true, y_pred) == {1: 0, 0: 1}
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(5 / 6)


def test_hungarian_mapping_accepts_string_labels_and_more_clusters_than_classes():
    # w: x -> a: 2, y -> b: 2, z -> b: 1.  x->a and y->b match; z is left unmatched (wrong): 4 of 5 right.
    y_true = ["a", "a", "b", "b", "b"]
    y_pred = ["x", "x", "y", "y", "z"]
    assert hungarian_mapping(y_true, y_pred) == {"x": "a", "y": "b"}
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(4 / 5)


def test_cluster_accuracy_with_fewer_clusters_than_classes():
    # One cluster for three classes of sizes 3, 2, 1: it maps to the largest class, 3 of 6 right.
    assert cluster_accuracy(["a", "a", "a", "b", "b", "c"], [5, 5, 5, 5, 5, 5]) == pytest.approx(0.5)


def test_f1_micro_equals_accuracy_on_random_labellings(rng):
    for _ in range(20):
        n_true, n_pred = int(rng.integers(2, 6)), int(rng.integers(2, 8))
        y_true = rng.integers(0, n_true, size=60)
        y_pred = rng.integers(0, n_pred, size=60)
        assert f1_micro(y_true, y_pred) == pytest.approx(cluster_accuracy(y_true, y_pred))


def test_nmi_and_ari_equal_sklearn(rng):
    y_true = rng.integers(0, 4, size=80)
    y_pred = rng.integers(0, 5, size=80)
    assert nmi(y_true, y_pred) == pytest.approx(normalized_mutual_info_score(y_true, y_pred))
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred))


def test_f1_macro_on_a_hand_case():
    # Mapped predictions (pred 1 -> 0, pred 0 -> 1): [0, 0, 1, 1, 1, 1] vs true [0, 0, 0, 1, 1, 1].
    # class 0: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 = 0.8; class 1: TP 3, FP 1, FN 0 -> P 3/4, R 1, F1 = 6/7.
    assert f1_macro([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]) == pytest.approx((0.8 + 6 / 7) / 2)


def test_f1_macro_counts_an_unmatched_cluster_as_wrong():
    # x -> a; one of y, z -> b, the other is unmatched so its sample is a miss for b.
    # class a: F1 1; class b: TP 1, FP 0, FN 1 -> F1 2/3; macro = 5/6.
    assert f1_macro(["a", "a", "b", "b"], ["x", "x", "y", "z"]) == pytest.approx(5 / 6)


def test_clustering_report_gathers_every_metric():
    report = clustering_report([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0])
    assert report["accuracy"] == pytest.approx(5 / 6)
    assert report["f1"] == pytest.approx(5 / 6)
    assert report["f1_macro"] == pytest.approx((0.8 + 6 / 7) / 2)
    assert report["nmi"] == pytest.approx(normalized_mutual_info_score([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]))
    assert report["ari"] == pytest.approx(adjusted_rand_score([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]))
    assert (report["n_clusters_pred"], report["n_classes_true"]) == (2, 2)


def test_clustering_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="y_true has 3 labels but y_pred has 2"):
        cluster_accuracy([0, 1, 1], [0, 1])


def test_clustering_metrics_reject_empty_and_2d_labels():
    with pytest.raises(ValueError, match="y_true is empty"):
        nmi([], [])
    with pytest.raises(ValueError, match="y_pred must be 1-D"):
        ari([0, 1], np.zeros((2, 1)))


# ---- image-level ROC metrics ----


def test_image_auroc_matches_sklearn_with_ties(rng):
    labels = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_and_fpr_on_a_fixed_hand_case():
    """The values the hand-written versions gave before scikit-learn replaced them."""
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.35, 0.9]
    assert image_auroc(labels, scores) == pytest.approx(7.5 / 9)
    assert fpr_at_tpr(labels, scores, 1.0) == pytest.approx(2 / 3)
    assert fpr_at_tpr(labels, scores, 2 / 3) == pytest.approx(0.0)


def test_image_auroc_rejects_a_single_class_and_non_binary_labels():
    with pytest.raises(ValueError, match="both classes"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1 or bool"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels has 3 entries but scores has 2"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_fpr_at_tpr_on_a_hand_case():
    # Positives 0.9, 0.8, 0.7, 0.6: 3 of 4 (TPR 0.75) are >= 0.7; negatives 0.75 and 0.65 and 0.1:
    # only 0.75 >= 0.7, so FPR = 1/3.
    labels = [1, 1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.75, 0.65, 0.1]
    assert fpr_at_tpr(labels, scores, tpr=0.75) == pytest.approx(1 / 3)


def test_fpr_at_tpr_matches_the_roc_curve(rng):
    labels = rng.integers(0, 2, size=300)
    scores = rng.random(300) + 0.5 * labels
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert fpr_at_tpr(labels, scores, tpr=0.95) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_fpr_at_tpr_rejects_a_tpr_outside_zero_one():
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_tpr([0, 1], [0.1, 0.9], tpr=1.5)


# ---- pixel-level metrics ----


def test_pixel_auroc_matches_sklearn_on_images_of_different_sizes(rng):
    masks = [rng.random((5, 7)) > 0.7, rng.random((9, 4)) > 0.8]
    maps = [np.round(rng.random(m.shape) + 0.4 * m, 2) for m in masks]
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps))


def test_aupro_is_one_for_a_perfect_map(blob_masks_and_maps, rng):
    masks, _ = blob_masks_and_maps
    maps = [np.where(mask, 0.6 + 0.4 * rng.random(mask.shape), 0.5 * rng.random(mask.shape)) for mask in masks]
    assert aupro(masks, maps) == pytest.approx(1.0)
    assert aupro(masks, maps, n_thresholds=50) == pytest.approx(1.0)


def test_aupro_plateau_when_one_of_two_equal_regions_is_found_first():
    # Regions A (cols 0-1) and B (cols 4-5), 2 pixels each, 10 normal pixels.  A scores 1.0 (above every
    # normal pixel), B scores 0.0 (below every normal pixel): PRO is 0.5 from FPR 0 up to FPR 1.
    # Area to 0.3 = 0.3 * 0.5, normalised by 0.3 -> 0.5.
    mask = np.zeros((1, 14), dtype=bool)
    mask[0, [0, 1, 4, 5]] = True
    anomaly_map = np.zeros((1, 14))
    anomaly_map[0, [0, 1]] = 1.0
    anomaly_map[0, ~mask[0]] = np.linspace(0.9, 0.45, 10)
    assert aupro([mask], [anomaly_map]) == pytest.approx(0.5)


def test_aupro_hand_integral_with_a_region_found_partway():
    # Same layout; B's pixels score 0.87 (between the 1st normal 0.9 and the 2nd 0.85) and 0.0.
    # Curve: (0, .5) -> (.1, .5) [1st normal] -> (.1, .75) [half of B] -> (.2, .75) -> (.3, .75).
    # Area to 0.3 = 0.1*0.5 + 0.2*0.75 = 0.2 -> 0.2/0.3.  To 0.25: 0.05 + 0.15*0.75 = 0.1625 -> /0.25 = 0.65.
    mask = np.zeros((1, 14), dtype=bool)
    mask[0, [0, 1, 4, 5]] = True
    anomaly_map = np.zeros((1, 14))
    anomaly_map[0, [0, 1]] = 1.0
    anomaly_map[0, 4] = 0.87
    anomaly_map[0, ~mask[0]] = np.linspace(0.9, 0.45, 10)
    assert aupro([mask], [anomaly_map]) == pytest.approx(0.2 / 0.3)
    assert aupro([mask], [anomaly_map], fpr_limit=0.25) == pytest.approx(0.65)


def test_aupro_tied_scores_move_the_curve_diagonally():
    # One region of 2 pixels (0.9, 0.5); normal pixels 0.5, 0.2, 0.1.  The 0.5 tie joins (0, .5) to (1/3, 1).
    # At FPR 0.3: PRO = 0.5 + 0.5 * 0.3/(1/3) = 0.95; area = 0.3 * (0.5 + 0.95)/2 = 0.2175 -> /0.3 = 0.725.
    mask = np.array([[True, True, False, False, False]])
    anomaly_map = np.array([[0.9, 0.5, 0.5, 0.2, 0.1]])
    assert aupro([mask], [anomaly_map]) == pytest.approx(0.725)


def test_aupro_regions_are_8_connected():
    # Diagonal pair (0,0)-(1,1) is one region; (0,3) is another.  (0,0) and (0,3) score above every normal
    # pixel and (1,1) below: PRO = mean(1/2, 1) = 0.75 (4-connectivity would give mean(1, 0, 1) = 2/3).
    mask = np.zeros((2, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[0, 3] = True
    anomaly_map = np.full((2, 5), 0.5)
    anomaly_map[0, 0] = anomaly_map[0, 3] = 1.0
    anomaly_map[1, 1] = 0.0
    anomaly_map[~mask] = np.linspace(0.6, 0.4, 7)
    assert aupro([mask], [anomaly_map]) == pytest.approx(0.75)


def test_aupro_is_unchanged_by_a_monotone_transform_of_the_maps(blob_masks_and_maps):
    masks, maps = blob_masks_and_maps
    transformed = [np.exp(3.0 * m) * 40.0 - 7.0 for m in maps]
    assert aupro(masks, transformed) == pytest.approx(aupro(masks, maps), abs=1e-12)


def test_aupro_matches_a_slow_reference_at_every_distinct_score(blob_masks_and_maps):
    masks, maps = blob_masks_and_maps
    maps = [np.round(m, 2) for m in maps]  # plenty of ties
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps, thresholds), abs=1e-9)


def test_aupro_matches_a_slow_reference_with_200_thresholds(blob_masks_and_maps):
    masks, maps = blob_masks_and_maps
    low, high = min(m.min() for m in maps), max(m.max() for m in maps)
    reference = reference_aupro(masks, maps, np.linspace(high, low, 200))
    assert aupro(masks, maps) == pytest.approx(reference, abs=1e-2)
    assert aupro(masks, maps, n_thresholds=200) == pytest.approx(reference, abs=1e-6)


def test_aupro_rejects_mismatched_inputs():
    mask, anomaly_map = np.eye(4, dtype=bool), np.random.default_rng(0).random((4, 4))
    with pytest.raises(ValueError, match="got 2 masks but 1 anomaly maps"):
        aupro([mask, mask], [anomaly_map])
    with pytest.raises(ValueError, match=r"mask 0 has shape \(4, 5\)"):
        aupro([np.zeros((4, 5), dtype=bool)], [anomaly_map])
    with pytest.raises(ValueError, match="anomaly map 0 must be 2-D"):
        pixel_auroc([mask], [anomaly_map[None]])


def test_aupro_rejects_masks_without_normal_pixels_or_regions():
    anomaly_map = np.random.default_rng(0).random((4, 4))
    with pytest.raises(ValueError, match="no normal"):
        aupro([np.ones((4, 4), dtype=bool)], [anomaly_map])
    with pytest.raises(ValueError, match="no defect region"):
        aupro([np.zeros((4, 4), dtype=bool)], [anomaly_map])


def test_aupro_rejects_bad_limits_and_non_finite_maps():
    mask = np.eye(4, dtype=bool)
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        aupro([mask], [np.ones((4, 4))], fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        aupro([mask], [np.full((4, 4), np.nan)])
