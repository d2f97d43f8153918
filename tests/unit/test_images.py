"""Sample grids."""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.tracking.images import image_grid, to_uint8


def test_to_uint8_maps_range_and_repeats_grey():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = to_uint8(x)
    assert out.shape == (1, 2, 2, 3)
    assert out[0, :, :, 0].ravel().tolist() == [0, 128, 255, 255]


def test_grid_layout_and_scale():
    imgs = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 1.0, -1.0)])
    grid = np.asarray(image_grid(imgs, nrow=2, pad=1))
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
    assert grid[1:5, 1:5].max() == 0 and grid[1:5, 6:10].min() == 255 and grid[6:10, 1:5].max() == 0
    assert grid[0, 0, 0] == 64 and grid[6:10, 6:10].min() == 64  # padding and the empty cell stay grey
    assert image_grid(imgs, nrow=2, pad=1, scale=3).size == (33, 33)
