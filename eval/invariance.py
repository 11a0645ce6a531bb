"""Per-factor invariance of a backbone's embedding, measured on the embedded world's counterfactuals.

    python -m eval.invariance --checkpoint RUN/backbone.pth [--world KEY=VALUE ...] [--n 500] [--split unseen]

The paper argues (its section 1) that semantic pairs make representations invariant to background,
occlusion, surface pattern and illumination, and does not measure it. Here, for each factor f of
common.world.FACTORS, common.world.counterfactuals renders n new instances twice, the second time
with only f redrawn (instance i has class i mod the number of classes). With e(x) the
L2-normalised global-pooled embedding (backbone in eval mode, centre view as in the probes):
  d_factor   = mean over i of ||e(x_i) - e(x_i with f redrawn)||^2
  d_instance = mean over pairs i != j of one class of ||e(x_i) - e(x_j)||^2  (another instance of
               the class, with its own nuisances)
  d_class    = mean over pairs of different classes of ||e(x_i) - e(x_j)||^2
  vs_instance = 1 - d_factor / d_instance        vs_class = 1 - d_factor / d_class
1 means the factor does not move the embedding, 0 that it moves it as far as a change of instance
(or of class), below 0 further. Both scores are scale-free (unit vectors, ratios of squared
distances), so backbones of any width and method compare; d_instance and d_class come from the
same base images x_i. n must give every class two instances (n >= 2 x classes); the default 500
gives 5 per class on the default 100-class world.
The world is the run's (its config.json --world), unless --world is given.
"""
import argparse
import dataclasses
import json
import time

import torch
from PIL import Image
from torch.utils.data import Dataset

from common import flags
from common.data import world_config
from common.features import extract_features
from common.transforms import eval_transform
from common.utils import run_main
from eval import report
from eval.datasets import add_eval_args, load_for_eval, result_path, world_settings


class ArrayImages(Dataset):
    """(transform(image), label) over uint8 N x H x W x 3 arrays."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def invariance_scores(base, changed, labels):
    """The scores of one factor from embeddings of the base images, of the same images with the
    factor redrawn (row i of each: instance i), and the instances' labels."""
    base = torch.nn.functional.normalize(base.double(), dim=1)
    changed = torch.nn.functional.normalize(changed.double(), dim=1)
    d_factor = (base - changed).square().sum(1).mean().item()
    dist = (2 - 2 * base @ base.T).clamp_min(0)
    same = labels[:, None] == labels[None, :]
    other_instance = same & ~torch.eye(len(labels), dtype=torch.bool)
    if not other_instance.any() or same.all():
        raise ValueError("need two instances of some class and two classes: use n >= 2 x the number of classes")
    d_instance, d_class = dist[other_instance].mean().item(), dist[~same].mean().item()
    return {"vs_instance": 1 - d_factor / d_instance, "vs_class": 1 - d_factor / d_class,
            "d_factor": d_factor, "d_instance": d_instance, "d_class": d_class, "n": len(labels)}


def measure(backbone, cfg, n, seed, unseen, img_size, device, batch_size=256):
    """{factor: scores} for a backbone on world `cfg`."""
    from common.world import FACTORS, counterfactuals

    view = eval_transform(img_size, resize_ratio=1.0)
    scores = {}
    for factor in FACTORS:
        pairs = counterfactuals(cfg, factor, n, seed, unseen=unseen)
        labels = torch.from_numpy(pairs["label"])
        base, changed = (extract_features(backbone, ArrayImages(pairs[k], labels, view), device, batch_size)[0]
                         for k in ("base", "changed"))
        scores[factor] = invariance_scores(base, changed, labels)
    return scores


def main(argv=None):
    parser = flags.Parser(prog="python -m eval.invariance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser, data=False)
    parser.add_argument("--n", type=flags.POSITIVE_INT, default=500, help="instances per factor")
    parser.set_defaults(dataset="embedded")
    args = parser.parse_args(argv)
    start = time.time()
    backbone, _ = load_for_eval(args)
    cfg = world_config(world_settings(args))
    scores = measure(backbone, cfg, args.n, args.seed, args.split == "unseen", args.img_size,
                     torch.device(args.device), args.batch_size)
    protocol = {"name": "counterfactual-invariance", "n": args.n, "counterfactual_seed": args.seed,
                "embedding": "global-pooled, L2-normalised, backbone in eval mode, centre view",
                "scores": "1 - d_factor / d_instance and 1 - d_factor / d_class (squared distances)",
                "world_config": dataclasses.asdict(cfg)}
    num_classes = cfg.unseen_classes if args.split == "unseen" else cfg.num_classes
    record = report.result_record(args, "invariance", scores=scores, num_classes=num_classes, protocol=protocol,
                                  time_s=time.time() - start)
    path = report.write_result(record, result_path(args, "invariance"))
    print(json.dumps({f: round(s["vs_instance"], 4) for f, s in scores.items()} | {"out": str(path)}))


if __name__ == "__main__":
    run_main(main)
