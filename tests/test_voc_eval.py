"""The VOC07 metric against hand-computed cases (expected values worked out by hand in comments)."""
import math

import numpy as np
import pytest

from eval.voc_eval import class_ap, iou_plus_one, voc_eval


def one_class(gt_boxes, difficult, dets, threshold=0.5):
    """AP of a one-image, one-class problem; dets: [(score, box)]."""
    gt = {"img": (np.array(gt_boxes, float).reshape(-1, 4), np.array(difficult, bool))}
    return class_ap(gt, (["img"] * len(dets), np.array([s for s, _ in dets]), np.array([b for _, b in dets], float)),
                    threshold)


A, B, D = (0, 0, 99, 99), (200, 200, 299, 299), (400, 0, 499, 99)  # 100 x 100 boxes (inclusive pixels)


def test_iou_counts_pixels_inclusively():
    # 10 x 10 pixels vs its top 10 x 5: 50 / 100 with the +1 convention (36 / 81 without).
    assert iou_plus_one(np.array([1, 1, 10, 5.0]), np.array([[1, 1, 10, 10.0]]))[0] == 0.5


def test_iou_of_exactly_threshold_is_no_match():
    # IoU 0.5 is not > 0.5: the only detection is a FP, recall stays 0.
    assert one_class([(1, 1, 10, 10)], [False], [(0.9, (1, 1, 10, 5))]) == 0.0
    assert one_class([(1, 1, 10, 10)], [False], [(0.9, (1, 1, 10, 6))]) == 1.0  # 60 / 100


def test_duplicates_and_difficult():
    # npos = 2 (D is difficult). In score order: A (TP), A again (FP, duplicate), D (ignored),
    # B (TP). recall .5 .5 .5 1; precision 1 .5 .5 2/3. Points 0..0.5 -> 1, 0.6..1 -> 2/3:
    # AP = (6 + 5 * 2/3) / 11.
    dets = [(0.9, A), (0.8, A), (0.7, D), (0.6, B)]
    assert one_class([A, B, D], [False, False, True], dets) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # Were D not difficult, it would be a TP and every recall point reached (npos 3).
    assert one_class([A, B, D], [False, False, False], dets) == pytest.approx((4 + 7 * 3 / 4) / 11)


def test_only_the_highest_iou_box_is_compared():
    # The second detection overlaps A most and B enough; A is taken, so it is a FP (a matcher
    # looking for the best unmatched box would give it B).
    gt = [(0, 0, 99, 99), (0, 40, 99, 139)]
    dets = [(0.9, (0, 0, 99, 99)), (0.8, (0, 10, 99, 109))]
    # IoU with A: 9000 / 11000 = 0.82, with B: 7000 / 13000 = 0.54. TP FP: AP = 6 / 11.
    assert one_class(gt, [False, False], dets) == pytest.approx(6 / 11)


def test_eleven_point_interpolation():
    # npos 4; TP FP TP TP FP TP: recall .25 .25 .5 .75 .75 1, precision 1 .5 2/3 3/4 3/5 2/3.
    # Points 0, .1, .2 -> 1; .3 .. .7 -> 3/4 (the best precision at recall >= t); .8 .9 1 -> 2/3.
    gt = [(i * 200, 0, i * 200 + 99, 99) for i in range(4)]
    far = (1000, 1000, 1099, 1099)
    dets = [(0.9, gt[0]), (0.8, far), (0.7, gt[1]), (0.6, gt[2]), (0.5, far), (0.4, gt[3])]
    assert one_class(gt, [False] * 4, dets) == pytest.approx((3 + 5 * 0.75 + 3 * 2 / 3) / 11)


def test_recall_of_three_tenths_misses_the_reference_grid_point():
    # The reference's grid np.arange(0, 1.1, 0.1) puts its fourth point at 0.30000000000000004.
    gt = [(i * 200, 0, i * 200 + 99, 99) for i in range(10)]
    assert one_class(gt, [False] * 10, [(0.9, gt[0]), (0.8, gt[1]), (0.7, gt[2])]) == pytest.approx(3 / 11)


def test_thresholds_ap50_ap_ap75():
    # IoU 0.68 (100 x 68 inside 100 x 100): TP at 0.50, 0.55, 0.60, 0.65, FP from 0.70 on.
    gt = {"img": (np.array([A], float), np.array([0]), np.array([False]))}
    result = voc_eval(gt, {"img": (np.array([(0, 0, 99, 67)], float), np.array([0]), np.array([0.9]))}, 1)
    assert (result["AP50"], result["AP75"], result["AP"]) == pytest.approx((100.0, 0.0, 40.0))


def test_class_without_detections_scores_zero_and_counts():
    gt = {"a": (np.array([A, B], float), np.array([0, 1]), np.array([False, False]))}
    dets = {"a": (np.array([A], float), np.array([0]), np.array([0.9]))}
    result = voc_eval(gt, dets, 2)
    assert result["per_class"][:, 0].tolist() == [100.0, 0.0]
    assert result["AP50"] == 50.0


def test_detection_in_image_without_that_class_is_false_positive():
    # Image "b" has no box of class 0; its higher-scored detection comes first: precision 1/2 at
    # recall 1 -> AP 0.5.
    gt = {"a": (np.array([A], float), np.array([0]), np.array([False])),
          "b": (np.array([B], float), np.array([1]), np.array([False]))}
    dets = {"a": (np.array([A], float), np.array([0]), np.array([0.5])),
            "b": (np.array([B, B], float), np.array([0, 1]), np.array([0.9, 0.9]))}
    result = voc_eval(gt, dets, 2)
    assert result["per_class"][:, 0] == pytest.approx([50.0, 100.0])


def test_class_without_positives_is_left_out():
    # Class 1 has only a difficult box: no recall, NaN, not in the mean.
    gt = {"a": (np.array([A, B], float), np.array([0, 1]), np.array([False, True]))}
    result = voc_eval(gt, {"a": (np.array([A], float), np.array([0]), np.array([0.9]))}, 2)
    assert math.isnan(result["per_class"][1, 0]) and result["AP50"] == 100.0


def test_unknown_image_is_an_error():
    gt = {"a": (np.array([A], float), np.array([0]), np.array([False]))}
    with pytest.raises(KeyError, match="without ground truth"):
        voc_eval(gt, {"zz": (np.array([A], float), np.array([0]), np.array([0.9]))}, 1)
