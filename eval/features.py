"""Frozen-backbone feature extraction shared by kNN, linear probes and invariance scores."""
import torch
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
