"""PASCAL VOC detection transfer: Faster R-CNN R50-C4 fine-tuned from a backbone.pth (the MoCo-v2
protocol of the paper's Table 2), built from torchvision's detection pieces.

    python -m eval.detection --checkpoint RUN/backbone.pth --voc-root DIR            # 24k iters, batch 16
    torchrun --nproc-per-node 8 -m eval.detection --checkpoint RUN/backbone.pth --voc-root DIR
    python -m eval.detection --checkpoint RUN/backbone.pth --voc-root embedded       # the world, on CPU

DIR holds VOCdevkit/VOC2007 and VOCdevkit/VOC2012; training uses 2007 + 2012 trainval, testing
2007 test, scored with the VOC07 11-point metric (eval/voc_eval.py): AP50, AP, AP75. With
`--voc-root embedded` the embedded world's VOC-format split (eval/voc_world.py) is generated in the
world's cache folder and the defaults shrink to CPU size (second column of DEFAULTS).

The model (shared/reference/evaluation.md, MoCo's detectron2 config R50-C4 + Res5ROIHeadsExtraNorm):
- backbone: the ResNet's stem..layer3 (res4, stride 16) feeds an RPN with 15 anchors per position
  (sizes 32-512 x aspect ratios 0.5, 1, 2) on that single map;
- box head: aligned RoIAlign 14x14 (sampling ratio 0) -> layer4 (res5, first block stride 2) ->
  an extra BatchNorm -> mean over H, W -> class scores and class-specific box deltas;
- nothing frozen, BN trained (SyncBN across GPUs), no weight decay on norm parameters, SGD with
  warm-up and two x0.1 steps, multi-scale training with horizontal flip, precise BN at the end.
A resnet18 backbone.pth also works (same C4 split, 256/512 channels): the CPU-sized world runs use it.
"""
import argparse
import itertools
import json
import math
import random
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import RoIAlign
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from common import data, flags, optim, utils
from common.backbones import build_backbone, infer_arch
from common.transforms import IMAGENET_MEAN, IMAGENET_STD
from eval import report
from eval.voc_eval import voc_eval

# flag: (VOC, as in the reference configuration; embedded world on 2 CPU cores)
DEFAULTS = {
    "iters": (24000, 300),
    "batch_size": (16, 4),
    "lr": (0.02, 0.02),                  # for a batch of 16; scaled linearly with --batch-size
    "warmup_iters": (100, 20),
    "min_sizes": (tuple(range(480, 801, 32)), (64, 80, 96)),
    "max_size": (1333, 160),
    # The res5 box head runs once per RoI and dominates the cost: on CPU, fewer and smaller RoIs.
    "roi_size": (14, 4),
    "rois_per_image": (512, 16),
    "test_proposals": (1000, 50),
    "precise_bn_iters": (200, 10),
    "checkpoint_every": (2000, 100),
    "workers": (4, 0),
    "train_sets": (("2007/trainval", "2012/trainval"), ("2007/trainval",)),
    "test_set": ("2007/test", "2007/test"),
}
REFERENCE_ITERS, REFERENCE_STEPS = 24000, (18000, 22000)  # lr x0.1 at these, scaled with --iters
REFERENCE_BATCH = 16


# ---------------------------------------------------------------- data

@dataclass
class Annotation:
    key: str                # "<year>/<image id>", unique over VOC2007 and VOC2012
    path: Path
    names: list
    boxes: np.ndarray       # n x 4, VOC pixels as stored: 1-based, inclusive
    difficult: np.ndarray   # n, bool


def layout(root, year="YEAR", image_set="SET"):
    return (f"{root}/VOCdevkit/VOC{year}/{{Annotations/<id>.xml, JPEGImages/<id>.jpg (or .png), "
            f"ImageSets/Main/{image_set}.txt}}")


def read_voc(root, split):
    """Annotations of one VOC image set, split = "<year>/<set>" (e.g. "2007/trainval")."""
    year, _, image_set = split.partition("/")
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    listing = base / "ImageSets" / "Main" / f"{image_set}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found; expected the VOC layout {layout(root, year, image_set)}")
    annotations = []
    for image_id in listing.read_text().split():
        xml = base / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{xml} not found (listed in {listing})")
        path = base / "JPEGImages" / f"{image_id}.jpg"
        if not path.is_file() and (base / "JPEGImages" / f"{image_id}.png").is_file():
            path = path.with_suffix(".png")
        names, boxes, difficult = [], [], []
        for obj in ET.parse(xml).findall("object"):
            box = obj.find("bndbox")
            names.append(obj.findtext("name").strip())
            boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            difficult.append(int(obj.findtext("difficult") or 0) == 1)
        annotations.append(Annotation(f"{year}/{image_id}", path, names, np.array(boxes, np.float64).reshape(-1, 4),
                                      np.array(difficult, bool)))
    return annotations


class VOCDetection(Dataset):
    """Items: (image float 3 x H x W in [0, 1], target {"boxes", "labels"}, index). Keys are indices
    or (index, seed) from SeededBatchSampler; in training the seed decides a horizontal flip.

    Boxes become 0-based continuous coordinates (xmin - 1, ymin - 1, xmax, ymax), labels 1..C
    (0 is background). Difficult objects are kept for training, as in the reference."""

    def __init__(self, annotations, classes, train):
        self.annotations, self.classes, self.train = annotations, list(classes), train
        index = {c: i + 1 for i, c in enumerate(self.classes)}
        for a in annotations:
            unknown = set(a.names) - set(index)
            if unknown:
                raise ValueError(f"{a.key}: class {sorted(unknown)[0]!r} is not among the training classes")
        self.labels = [torch.tensor([index[n] for n in a.names], dtype=torch.int64) for a in annotations]

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        a = self.annotations[index]
        image = pil_to_tensor(data.load_rgb(a.path)).float().div_(255)
        boxes = torch.from_numpy(a.boxes).float() - torch.tensor([1.0, 1.0, 0.0, 0.0])
        if self.train and random.Random(seed).random() < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": self.labels[index]}, index

    def ground_truth(self):
        """{key: (boxes as stored, class indices 0..C-1, difficult)} for voc_eval."""
        return {a.key: (a.boxes, labels.numpy() - 1, a.difficult) for a, labels in zip(self.annotations, self.labels)}


def collate(batch):
    return tuple(zip(*batch))


def voc_datasets(root, train_sets, test_set):
    """(train, test) datasets; the classes are the sorted object names of the training
    annotations (on VOC: the 20 classes in their usual, alphabetical order)."""
    train = [a for split in train_sets for a in read_voc(root, split)]
    classes = sorted({n for a in train for n in a.names})
    if not classes:
        raise FileNotFoundError(f"no objects in {', '.join(train_sets)} under {root}")
    return VOCDetection(train, classes, train=True), VOCDetection(read_voc(root, test_set), classes, train=False)


# ---------------------------------------------------------------- model

class C4Trunk(nn.Module):
    """A torchvision ResNet's stem..layer3 ("res4": stride 16). Attribute names are the ResNet's,
    so the backbone.pth keys map one to one (prefixed "backbone.")."""

    def __init__(self, resnet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.out_channels = resnet.layer4[0].conv1.in_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class Res5Head(nn.Module):
    """The box head: the ResNet's layer4 ("res5", its first block has stride 2), the extra BN of
    MoCo's Res5ROIHeadsExtraNorm on its output, then the mean over the RoI's positions."""

    def __init__(self, layer4):
        super().__init__()
        self.layer4 = layer4
        self.out_channels = [m for m in layer4[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x):
        return self.norm(self.layer4(x)).mean(dim=(2, 3))


class BoxPredictor(nn.Module):
    """Class scores (background first) and class-specific box deltas, initialised as the reference
    (std 0.01 and 0.001). torchvision's post-processing expects deltas for every class including
    background; that slot is never trained or used."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class L1RPN(RegionProposalNetwork):
    """torchvision's RPN with the reference's losses: plain L1 on the box deltas (torchvision uses
    smooth-L1 with beta 1/9), both losses summed over the sampled anchors and divided by
    256 x images (detectron2's normaliser)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        positive, negative = self.fg_bg_sampler(labels)
        positive, negative = torch.cat(positive), torch.cat(negative)
        sampled = torch.where(positive | negative)[0]
        positive = torch.where(positive)[0]
        normaliser = self.fg_bg_sampler.batch_size_per_image * len(labels)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], torch.cat(regression_targets)[positive], reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled],
                                                             reduction="sum")
        return objectness_loss / normaliser, box_loss / normaliser


class C4RoIHeads(RoIHeads):
    """Box-only RoI heads for one feature map with the reference's pooler and loss.

    torchvision's FasterRCNN accepts only a MultiScaleRoIAlign pooler, which has no aligned=True
    option, and its RoIHeads.forward uses smooth-L1 (beta 1/9) for the box loss. We therefore
    assemble GeneralizedRCNN ourselves (FasterRCNN only wires the same parts with FPN defaults),
    pool with RoIAlign(aligned=True) directly, and compute the box loss with plain L1, divided by
    the number of sampled RoIs as in the reference. Sampling, box coding and post-processing are
    torchvision's."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_roi_pool(features["0"], proposals)
        class_logits, box_regression = self.box_predictor(self.box_head(x))
        if not self.training:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            return [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, labels)], {}
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        positive = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(len(labels), -1, 4)[positive, labels[positive]]
        box_loss = F.l1_loss(deltas, regression_targets[positive], reduction="sum") / max(labels.numel(), 1)
        return [], {"loss_classifier": F.cross_entropy(class_logits, labels), "loss_box_reg": box_loss}


def build_detector(resnet, num_classes, min_sizes=DEFAULTS["min_sizes"][0], max_size=1333, roi_size=14,
                   rois_per_image=512, test_proposals=1000):
    """Faster R-CNN C4 around a torchvision ResNet (its weights are used, not copied);
    num_classes excludes background. At test time images get min_sizes[-1] (torchvision's rule)."""
    trunk, head = C4Trunk(resnet), Res5Head(resnet.layer4)
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    rpn = L1RPN(anchors, RPNHead(trunk.out_channels, anchors.num_anchors_per_location()[0]),
                fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
                pre_nms_top_n=dict(training=12000, testing=6000),
                post_nms_top_n=dict(training=2000, testing=test_proposals), nms_thresh=0.7)
    roi_heads = C4RoIHeads(RoIAlign(roi_size, spatial_scale=1 / 16, sampling_ratio=0, aligned=True), head,
                           BoxPredictor(head.out_channels, num_classes + 1),
                           fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=rois_per_image,
                           positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                           score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
    # The transform normalises with ImageNet mean/std itself: the datasets give raw [0, 1] images.
    transform = GeneralizedRCNNTransform(tuple(min_sizes), max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return GeneralizedRCNN(trunk, rpn, roi_heads, transform)


def load_resnet(path):
    """The torchvision ResNet of a backbone.pth, every key of the file loaded (strict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    arch, _ = infer_arch(state)
    if arch not in ("resnet50", "resnet18"):
        raise SystemExit(f"error: {path} holds a {arch} backbone; the C4 detector needs a torchvision ResNet "
                         "(resnet50 as in the paper, or resnet18 for CPU runs)")
    resnet, _ = build_backbone(arch)
    resnet.load_state_dict(state, strict=True)
    return resnet


# ---------------------------------------------------------------- optimisation

def param_groups(model, weight_decay):
    """Weight decay on every parameter but those of normalisation layers (the reference's
    WEIGHT_DECAY_NORM = 0; biases keep their decay, as there)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)  # SyncBatchNorm included
    norm, rest = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(module, norm_types) else rest).extend(params)
    return [{"params": rest, "weight_decay": weight_decay}, {"params": norm, "weight_decay": 0.0}]


def learning_rate(it, base, iters, warmup_iters, warmup_factor=0.001):
    """Linear warm-up from warmup_factor x base, then x0.1 at 18k and 22k of 24k (scaled to iters)."""
    steps = [round(s * iters / REFERENCE_ITERS) for s in REFERENCE_STEPS]
    lr = base * 0.1 ** sum(it >= s for s in steps)
    if it < warmup_iters:
        alpha = it / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def batches(loader, sampler, epoch=0, start_batch=0):
    """Endless batches: epoch after epoch of the seeded sampler, starting mid-epoch on resume."""
    while True:
        sampler.set_epoch(epoch, start_batch)
        yield from loader
        epoch, start_batch = epoch + 1, 0


@torch.no_grad()
def precise_bn(model, batch_iter, device):
    """Re-estimates every BatchNorm's running statistics as the plain average of the batch
    statistics over the given training batches (detectron2's PreciseBN; momentum None makes
    PyTorch keep exactly that cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for images, targets, _ in batch_iter:
        model([x.to(device) for x in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.no_grad()
def detect(model, dataset, device, rank=0, world_size=1, batch_size=2, workers=0):
    """{key: (boxes in VOC coordinates, class indices 0..C-1, scores)} for every image of the
    dataset, each process detecting its share; gathered on every process."""
    model.eval()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate)
    results = {}
    for images, _, indices in tqdm(loader, desc="test", disable=rank != 0, leave=False, dynamic_ncols=True):
        for index, out in zip(indices, model([x.to(device) for x in images])):
            boxes = out["boxes"].double().cpu().numpy()
            boxes[:, :2] += 1  # back to VOC's 1-based inclusive convention, as the reference writes them
            results[dataset.annotations[index].key] = (boxes, out["labels"].cpu().numpy() - 1,
                                                       out["scores"].double().cpu().numpy())
    if world_size > 1:
        shards = [None] * world_size
        dist.all_gather_object(shards, results)
        results = {k: v for shard in shards for k, v in shard.items()}
    return results


def evaluate(model, dataset, device, rank=0, world_size=1, batch_size=2, workers=0):
    """AP50, AP, AP75 (x100) and per-class AP50 / AP of the model on the dataset."""
    table = voc_eval(dataset.ground_truth(), detect(model, dataset, device, rank, world_size, batch_size, workers),
                     len(dataset.classes))
    per_class = table.pop("per_class")
    table["per_class_AP50"] = dict(zip(dataset.classes, per_class[:, 0].round(2).tolist()))
    table["per_class_AP"] = dict(zip(dataset.classes, per_class.mean(axis=1).round(2).tolist()))
    return table


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = flags.Parser("python -m eval.detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a backbone.pth of a torchvision ResNet (resnet50 or resnet18)")
    p.add_argument("--voc-root", required=True,
                   help=f"folder holding {layout('DIR')}, or 'embedded' for the embedded world's VOC split")
    p.add_argument("--world", nargs="*", type=data.world_setting, metavar="KEY=VALUE",
                   help="embedded-world settings (with --voc-root embedded; default: the backbone's world, from "
                        "its config.json)")
    p.add_argument("--train-sets", nargs="+", metavar="YEAR/SET", help="default 2007/trainval 2012/trainval")
    p.add_argument("--test-set", metavar="YEAR/SET", help="default 2007/test")
    p.add_argument("--iters", type=flags.POSITIVE_INT, help="training iterations (default 24000)")
    p.add_argument("--batch-size", type=flags.POSITIVE_INT, help="global batch (images), split over processes")
    p.add_argument("--lr", type=flags.POSITIVE, help="learning rate for a batch of 16, scaled linearly (default 0.02)")
    p.add_argument("--weight-decay", type=flags.NON_NEGATIVE, default=1e-4)
    p.add_argument("--warmup-iters", type=flags.COUNT, help="linear warm-up iterations (default 100; 0: none)")
    p.add_argument("--min-sizes", type=flags.bounded(int, 32), nargs="+",
                   help="training short sides, one drawn per image; the LAST is the test size (default 480 512 .. 800)")
    p.add_argument("--max-size", type=flags.bounded(int, 32), help="cap on the long side (default 1333)")
    p.add_argument("--roi-size", type=flags.POSITIVE_INT, help="RoIAlign output size (default 14)")
    p.add_argument("--rois-per-image", type=flags.POSITIVE_INT, help="sampled RoIs per training image (default 512)")
    p.add_argument("--test-proposals", type=flags.POSITIVE_INT, help="RPN proposals per test image after NMS (default 1000)")
    p.add_argument("--precise-bn-iters", type=flags.COUNT,
                   help="training batches for precise BN at the end (default 200; 0: off)")
    p.add_argument("--checkpoint-every", type=flags.COUNT,
                   help="iterations between checkpoints (default 2000; 0: at the end only)")
    p.add_argument("--test-batch-size", type=flags.POSITIVE_INT, default=1,
                   help="images per process at test time (1 as in the reference: batching adds padding)")
    p.add_argument("--workers", type=flags.COUNT, help="data-loading processes per process (0: in the process)")
    p.add_argument("--seed", type=flags.SEED, default=0)
    p.add_argument("--out", help="output folder (default runs/detection-<checkpoint folder>-s<seed>)")
    p.add_argument("--result", help="the result JSON for eval/report.py (default: RUN/results/"
                   "detection-<voc>-s<seed>.json next to the checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth if it exists")
    p.add_argument("--device", type=flags.device, default=flags.default_device())
    p.add_argument("--log-every", type=flags.POSITIVE_INT, default=20)
    args = p.parse_args(argv)
    embedded = args.voc_root == "embedded"
    for flag, (real, world) in DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, list(world if embedded else real) if isinstance(real, tuple) else
                    world if embedded else real)
    args.out = args.out or f"runs/detection-{Path(args.checkpoint).resolve().parent.name}-s{args.seed}"
    return args


def write_report_result(args, result, embedded):
    """The sempairs-eval/1 record of this run (eval/report.py's Table 2 layout)."""
    from eval.datasets import run_config
    from eval.features import file_digest

    args.run, args.dataset, args.split = run_config(args.checkpoint), "voc-embedded" if embedded else "voc07", None
    args.img_size, args.checkpoint_sha256 = args.min_sizes[-1], file_digest(args.checkpoint)
    path = args.result or Path(args.checkpoint).parent / "results" / f"detection-{args.dataset}-s{args.seed}.json"
    record = report.result_record(args, "detection", metrics={k: result[k] for k in ("AP50", "AP", "AP75")},
                                  protocol={k: getattr(args, k) for k in ("iters", "batch_size", "lr", "min_sizes",
                                                                          "max_size", "train_sets", "test_set")})
    report.write_result(record, path)


def main(argv=None):
    args = parse_args(argv)
    resnet = load_resnet(args.checkpoint)
    embedded = args.voc_root == "embedded"
    if embedded:
        from common.world import ensure_world
        from eval.datasets import run_config
        from eval.voc_world import ensure_voc

        # By default the backbone's own world (its config.json), as the probes do.
        world = args.world if args.world is not None else run_config(args.checkpoint).get("world")
        args.voc_root = str(ensure_voc(ensure_world(data.world_config(world))))
    train_set, test_set = voc_datasets(args.voc_root, args.train_sets, args.test_set)
    args.precision = "fp32"  # detectron2's default (SOLVER.AMP.ENABLED False), which MoCo's setup keeps
    run = utils.Run(args)
    if run.main:
        print(f"{len(train_set)} training images ({' + '.join(args.train_sets)}), {len(test_set)} test images "
              f"({args.test_set}), {len(train_set.classes)} classes, from {args.voc_root}", file=sys.stderr)

    model = build_detector(resnet, len(train_set.classes), args.min_sizes, args.max_size, args.roi_size,
                           args.rois_per_image, args.test_proposals)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=0.0, momentum=0.9)
    # SyncBN needs CUDA; on CPU each process keeps its own BN statistics.
    model = run.prepare(model, sync_bn=run.device.type == "cuda")
    base_lr = args.lr * args.batch_size / REFERENCE_BATCH

    sampler = data.SeededBatchSampler(len(train_set), args.batch_size, args.seed, rank=run.rank,
                                      world_size=run.world_size)
    if len(sampler) == 0:
        raise data.ImageError(f"{len(train_set)} training images, fewer than one batch of {args.batch_size}")
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate,
                        pin_memory=run.device.type == "cuda", persistent_workers=args.workers > 0)
    start = 0
    if args.resume and run.checkpoint_path.exists():
        ckpt = torch.load(run.checkpoint_path, map_location=run.device, weights_only=True)
        run.unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        random.setstate(ckpt["rng"]["python"])
        start = ckpt["iter"]
        if run.main:
            print(f"resumed from {run.checkpoint_path} at iteration {start}", file=sys.stderr)

    model.train()
    bar = tqdm(range(start, args.iters), desc="train", disable=not run.main, dynamic_ncols=True)
    tick, seen = time.perf_counter(), 0
    for it, (images, targets, _) in zip(bar, batches(loader, sampler, *divmod(start, len(sampler)))):
        lr = learning_rate(it, base_lr, args.iters, args.warmup_iters)
        optim.set_lr(optimizer, lr)
        images = [x.to(run.device, non_blocking=True) for x in images]
        targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise utils.NonFiniteLoss(f"loss is {loss.item()} at iteration {it}; last good checkpoint: "
                                      f"{run.checkpoint_path if run.checkpoint_path.exists() else 'none written yet'}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(images) * run.world_size
        if it % args.log_every == 0 or it + 1 == args.iters:
            rate = seen / (time.perf_counter() - tick)
            run.write_log(iter=it, loss=loss.item(), lr=lr, images_per_s=rate,
                          **{k: v.item() for k, v in losses.items()})
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}")
        if run.main and ((it + 1) % args.checkpoint_every == 0 or it + 1 == args.iters):
            utils.save_atomic({"model": run.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                               "iter": it + 1, "args": vars(args),
                               "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                              run.checkpoint_path)
    bar.close()

    detector = run.unwrap(model)
    if args.precise_bn_iters > 0:
        epoch = args.iters // len(sampler) + 1  # batches the training did not see in this order
        precise_bn(detector, itertools.islice(batches(loader, sampler, epoch), args.precise_bn_iters), run.device)
    if run.main:
        utils.save_atomic({k: v.cpu() for k, v in detector.state_dict().items()}, run.out / "detector.pth")
    result = evaluate(detector, test_set, run.device, run.rank, run.world_size, args.test_batch_size, args.workers)
    result.update(checkpoint=args.checkpoint, iters=args.iters, batch_size=args.batch_size, test_set=args.test_set,
                  voc_root=args.voc_root)
    if run.main:
        (run.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        write_report_result(args, result, embedded)
        run.write_log(**{k: result[k] for k in ("AP50", "AP", "AP75")})
        print(json.dumps({k: result[k] for k in ("AP50", "AP", "AP75", "checkpoint")}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    utils.run_main(main)
