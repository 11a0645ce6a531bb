"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO), the
classifier in common/features.py.

    python -m eval.knn --checkpoint RUN/backbone.pth --dataset stl10 --data-root DATA [--crop random]
    python -m eval.knn --checkpoint RUN/backbone.pth --dataset embedded --split unseen

The bank is the training set, the queries the test set, both in the views and with the cached
features of eval.linear_probe (eval.datasets); the result file follows eval/report.py's schema.
"""
import argparse
import json
import time

import torch

from common import flags
from common.features import knn_accuracy


def main(argv=None):
    from eval import report
    from eval.datasets import add_eval_args, dataset_features, load_for_eval, result_path, view_protocol

    parser = flags.Parser(prog="python -m eval.knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    parser.add_argument("--k", type=flags.POSITIVE_INT, default=20, help="neighbours that vote")
    parser.add_argument("--temperature", type=flags.POSITIVE, default=0.07, help="votes weigh exp(similarity / T)")
    args = parser.parse_args(argv)
    start = time.time()
    backbone, _ = load_for_eval(args)
    bank, bank_labels, classes = dataset_features(args, backbone, "train")
    queries, labels, _ = dataset_features(args, backbone, "test", args.crop)
    device = torch.device(args.device)
    acc = knn_accuracy(bank.to(device), bank_labels.to(device), queries.to(device), labels.to(device), len(classes),
                       args.k, args.temperature)
    protocol = {"name": "weighted-knn", "k": args.k, "temperature": args.temperature,
                "features": "global-pooled, L2-normalised, backbone in eval mode, centre view",
                "train_view": view_protocol(args.img_size, "center", args.seed),
                "test_view": view_protocol(args.img_size, args.crop, args.seed)}
    record = report.result_record(args, "knn", accuracy=acc, num_classes=len(classes), num_train=len(bank_labels),
                                  num_test=len(labels), protocol=protocol, time_s=time.time() - start)
    path = report.write_result(record, result_path(args, "knn", args.crop))
    print(json.dumps({k: record[k] for k in ("eval", "dataset", "split", "crop", "accuracy")} | {"out": str(path)}))


if __name__ == "__main__":
    from common.utils import run_main

    run_main(main)
