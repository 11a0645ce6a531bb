"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO).

Features are L2-normalised; each of the k most cosine-similar bank samples votes for its
class with weight exp(similarity / T). Works for any number of queries and classes.

    python -m eval.knn --checkpoint RUN/backbone.pth --train DIR --test DIR [--img-size 224]
"""
import argparse
import json

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(bank, bank_labels, queries, num_classes, k=20, temperature=0.07, chunk=1024):
    """Class scores (queries x classes) from the k nearest bank features."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=20, temperature=0.07):
    """Top-1 accuracy in percent."""
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature).argmax(1)
    return 100.0 * (pred == query_labels).float().mean().item()


def main(argv=None):
    from common.backbones import load_backbone
    from common.data import LabelledImages, image_folder
    from common.transforms import eval_transform
    from eval.features import extract_features

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a backbone.pth")
    parser.add_argument("--train", required=True, help="ImageFolder root of the labelled bank")
    parser.add_argument("--test", required=True, help="ImageFolder root of the queries")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backbone = load_backbone(args.checkpoint, args.img_size)[0].to(device)
    tf = eval_transform(args.img_size)
    bank_samples, classes = image_folder(args.train)
    test_samples = image_folder(args.test, classes)[0]
    bank, bank_labels = extract_features(backbone, LabelledImages(bank_samples, tf, classes), device)
    queries, labels = extract_features(backbone, LabelledImages(test_samples, tf, classes), device)
    acc = knn_accuracy(bank, bank_labels, queries, labels, len(classes), args.k, args.temperature)
    print(json.dumps({"knn_top1": acc, "k": args.k, "temperature": args.temperature, "checkpoint": args.checkpoint}))


if __name__ == "__main__":
    main()
