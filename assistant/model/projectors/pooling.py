"""Optional average pooling of the patch grid: fewer image tokens, faster prompts."""

import math

import torch.nn.functional as F


def pool_patches(features, grid: int | None):
    """(images, patches, dim) -> (images, grid*grid, dim); patches must form a square grid."""
    if not grid:
        return features
    n, p, d = features.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"cannot pool {p} patch features: not a square grid (is the CLS token kept?)")
    x = features.transpose(1, 2).reshape(n, d, side, side)
    x = F.adaptive_avg_pool2d(x, grid)
    return x.reshape(n, d, grid * grid).transpose(1, 2)


def pooled_count(num_patches: int, grid: int | None) -> int:
    return grid * grid if grid else num_patches
