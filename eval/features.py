"""A cache of frozen-backbone features (common/features.py), so that a probe costs one forward
pass over the data per checkpoint."""
import hashlib
import sys
from pathlib import Path

import torch

from common.features import extract_features
from common.utils import save_atomic


def file_digest(path):
    """SHA-256 of a file: a retrained or replaced checkpoint gets new cached features."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_features(backbone, dataset, device, path, key, batch_size=256, workers=0):
    """extract_features, stored at `path` together with `key` (a dict of str, int and float
    naming the checkpoint digest, data and view) and reused while the stored key is equal."""
    path = Path(path)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored["key"] == key:
            return stored["features"], stored["labels"]
    feats, labels = extract_features(backbone, dataset, device, batch_size, workers)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"key": key, "features": feats, "labels": labels}, path)
    except OSError as e:  # a read-only run folder costs recomputation, not the result
        print(f"warning: cannot cache features at {path}: {e}", file=sys.stderr)
    return feats, labels
