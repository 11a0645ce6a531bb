"""Frozen-backbone features and the weighted k-nearest-neighbour classifier on them (Wu et al.
2018; DINO), shared by the training scripts' kNN monitor and the evaluations (eval/).

kNN: features are L2-normalised; each of the k most cosine-similar bank samples votes for its
class with weight exp(similarity / T). Works for any number of queries and classes.
"""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, workers=0):
    """(features, labels) of a labelled dataset, with the backbone in eval mode (BN frozen)."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            f = backbone(x.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


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
