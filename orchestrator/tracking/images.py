"""Sample grids: a batch of generated images as one PNG people can look at, and which class each grid cell shows
(row r: class r mod the class count, in training grids and in ``ganforge sample`` alike)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W in [-1, 1] → N×H×W×C uint8 (C=3; grey is repeated)."""
    x = images.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile N images into a grid with ``pad`` pixels of grey between them; nearest-neighbour ``scale``-up."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or grid_columns(n)
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 64, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def grid_columns(n: int) -> int:
    """Images per grid row (``image_grid``'s default): a square-ish grid."""
    return math.ceil(math.sqrt(n))


def grid_labels(n: int, c_dim: int, nrow: int, class_: int | None = None) -> torch.Tensor | None:
    """Class labels for a grid of ``n``: ``class_`` everywhere, or row r holds class r mod ``c_dim``; None when the
    model is unconditional."""
    if not c_dim:
        if class_ is not None:
            raise ValueError(f"class {class_} given but the model is unconditional")
        return None
    if class_ is not None:
        if not 0 <= class_ < c_dim:
            raise ValueError(f"class {class_} out of range; valid: 0..{c_dim - 1}")
        return torch.full((n,), class_, dtype=torch.int64)
    return (torch.arange(n) // nrow) % c_dim
