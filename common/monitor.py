"""A collapse monitor the method scripts log every step."""
import math

import torch.nn.functional as F


def embedding_std(z):
    """Mean over dimensions of the batch standard deviation of the L2-normalised rows of z, times
    sqrt(dim): near 1 when the embeddings spread evenly over all dimensions, 0 when every input
    maps to the same direction (the collapse criterion of Chen & He's SimSiam, scaled by sqrt(dim))."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])
