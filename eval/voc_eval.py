"""The PASCAL VOC07 detection metric, as computed by the reference evaluator (py-faster-rcnn's
voc_eval, used by detectron2's PascalVOCDetectionEvaluator), in plain numpy.

Per class and IoU threshold t in 0.50, 0.55, ..., 0.95: detections are taken in order of
decreasing score; each is compared only with the ground-truth box of highest IoU in its image
(IoU with the +1 pixel convention of VOC's inclusive integer boxes). If that IoU > t (strictly):
a difficult box makes the detection neither TP nor FP, an unmatched box makes it a TP (and
matched), an already matched box makes it a FP; otherwise it is a FP. Recall counts only
non-difficult boxes. AP is the VOC2007 11-point interpolation: the mean over
r in np.arange(0, 1.1, 0.1) of the highest precision at recall >= r (0 where recall never gets
there). The grid is kept exactly as the reference builds it: its points 0.3, 0.6 and 0.7 lie a
hair above those decimals, so a recall of exactly 3/10 does not reach the 0.3 point.

AP50 and AP75 are class means at t = 0.5 and 0.75, AP the mean over the ten thresholds, all x100.
A class without non-difficult ground truth has no recall: its AP is NaN and it is left out of the
means (cannot happen on VOC07 test, where every class has positives).

Boxes are in VOC pixel coordinates (xmin, ymin, xmax, ymax), 1-based and inclusive: ground
truth as stored in the XML files; detections of a model working in 0-based continuous
coordinates get 1 added to xmin and ymin, as the reference does when writing them.
"""
import numpy as np

IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))
RECALL_POINTS = np.arange(0.0, 1.1, 0.1)  # the reference's grid, floating-point quirks included


def iou_plus_one(box, boxes):
    """IoU of one box with each row of `boxes`, counting pixels inclusively (+1 on each side)."""
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0.0)
    inter = iw * ih
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    return inter / (area + areas - inter)


def ap_11_point(recall, precision):
    """VOC2007 11-point interpolated average precision."""
    return float(np.mean([precision[recall >= r].max() if np.any(recall >= r) else 0.0 for r in RECALL_POINTS]))


def class_ap(gt, dets, threshold):
    """AP of one class at one IoU threshold.

    gt: {image_id: (boxes (n, 4), difficult (n,) bool)} for every test image (empty arrays where
    the image has no box of the class); dets: (image_ids (m,), scores (m,), boxes (m, 4)).
    Returns NaN when the class has no non-difficult ground truth.
    """
    num_positives = sum(int((~difficult).sum()) for _, difficult in gt.values())
    if num_positives == 0:
        return float("nan")
    image_ids, scores, boxes = dets
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    matched = {image: np.zeros(len(difficult), bool) for image, (_, difficult) in gt.items()}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, d in enumerate(order):
        gt_boxes, difficult = gt[image_ids[d]]
        if len(gt_boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = iou_plus_one(np.asarray(boxes[d], dtype=np.float64), gt_boxes)
        best = int(np.argmax(overlaps))
        if overlaps[best] > threshold:
            if difficult[best]:
                continue
            if matched[image_ids[d]][best]:
                fp[rank] = 1
            else:
                tp[rank] = 1
                matched[image_ids[d]][best] = True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ap_11_point(recall, precision)


def voc_eval(ground_truth, detections, num_classes):
    """VOC07 AP table.

    ground_truth: {image_id: (boxes (n, 4), labels (n,) in 0..num_classes-1, difficult (n,))}
    for every test image; detections: {image_id: (boxes (m, 4), labels (m,), scores (m,))}
    (images without detections may be absent). Boxes in VOC coordinates (see the module doc).
    Returns {"AP50", "AP", "AP75": class means x100, "per_class": classes x thresholds array x100}.
    """
    unknown = set(detections) - set(ground_truth)
    if unknown:
        raise KeyError(f"detections for {len(unknown)} images without ground truth, e.g. {sorted(unknown)[0]!r}")
    table = np.zeros((num_classes, len(IOU_THRESHOLDS)))
    for c in range(num_classes):
        gt = {}
        for image, (boxes, labels, difficult) in ground_truth.items():
            keep = np.asarray(labels) == c
            gt[image] = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[keep],
                         np.asarray(difficult, dtype=bool)[keep])
        ids, scores, boxes = [], [np.zeros(0)], [np.zeros((0, 4))]
        for image, (b, labels, s) in detections.items():
            keep = np.asarray(labels) == c
            ids += [image] * int(keep.sum())
            scores.append(np.asarray(s, dtype=np.float64)[keep])
            boxes.append(np.asarray(b, dtype=np.float64).reshape(-1, 4)[keep])
        table[c] = [class_ap(gt, (ids, np.concatenate(scores), np.concatenate(boxes)), t) for t in IOU_THRESHOLDS]
    table *= 100
    scored = np.isfinite(table[:, 0])  # classes with positives
    if not scored.any():
        raise ValueError("no non-difficult ground-truth box in any class")
    mean = table[scored].mean(axis=0)
    return {"AP50": float(mean[0]), "AP": float(mean.mean()), "AP75": float(mean[IOU_THRESHOLDS.index(0.75)]),
            "per_class": table}
